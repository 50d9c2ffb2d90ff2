"""Process-level faults of real pre-training runs (docs/training.md, "Faults"): 2-rank CPU jobs through the
deepspeed launcher (gloo, fp32), 1 rank for Ctrl-C.

* A second job on a run directory in use is refused, naming the holder, before it writes anything;
  the first job trains on, every step logged once.
* kill -9 of the launcher: both ranks stop within seconds, commit nothing more, and `--resume
  auto` reproduces an uninterrupted run bit for bit.
* A stalled rank (SIGSTOP) fails the job after `distributed.timeout_s`, naming the step and the rank.
* Ctrl-C (SIGINT) of a run: MLflow says KILLED, the exit status is non-zero.

Every job runs in its own session; each test kills its process group in `finally`.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launch_helpers import cpu_env, pretrain_argv

from celljepa_dist.train.interrupts import EXIT_GRACE_S

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
BASE_SETS = ["data.batch_size=8", "deterministic=true", "deepspeed.zero_stage=1", "tracking.progress=false"]
# A job that is still training when the test acts on it (killed by the test long before the end).
LONG = ["epochs=100", "max_steps=1000"]


def _argv(run_dir: Path, shards: Path, vocab: Path, sets: list[str], ranks: int = 2) -> list[str]:
    return pretrain_argv(CONFIG, [f"run_dir={run_dir}", f"vocab={vocab}", f"data.shards_dir={shards}",
                                  *BASE_SETS, *sets], ranks=ranks, launcher=ranks > 1)


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    """A job in its own session (its process group is the whole job), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, env=cpu_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGCONT (a stopped rank) and SIGKILL to the job's process group: nothing is left behind,
    ranks re-parented away from a killed launcher included (they keep the group)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass


def _progress(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def _wait_step(run_dir: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = _progress(run_dir)
        if now >= step:
            return now
        assert proc.poll() is None, f"the job ended before step {step}:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s:\n{log.read_text()[-3000:]}")


def _ranks(launcher_pid: int) -> dict[int, psutil.Process]:
    """The job's rank processes by rank, found from the process tree (not from the run's own files)."""
    out = {}
    for p in psutil.Process(launcher_pid).children(recursive=True):
        m = re.search(r"--local_rank=(\d+)", " ".join(p.cmdline()))
        if m and any(a.endswith("pretrain.py") for a in p.cmdline()):
            out[int(m.group(1))] = p
    return out


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # nobody reaps orphans under some container inits
    except psutil.NoSuchProcess:
        return True


def _committed(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("*/COMMITTED"))


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.fixture
def job(tiny_shards, tmp_path):
    shards, vocab = tiny_shards
    return lambda run_dir, sets, ranks=2: _argv(run_dir, shards, vocab, sets, ranks)


# --- 1. one job per run directory ----------------------------------------------------------------

@pytest.mark.multiproc
@pytest.mark.slow  # two jobs: ~95 s on 2 cores (tests/test_faults_run_units.py has the lock on its own)
def test_second_job_on_a_run_dir_in_use_is_refused_before_it_writes(job, tmp_path):
    run_dir = tmp_path / "run"
    sets = LONG + ["checkpoint.every_steps=5"]
    first_log = tmp_path / "first.log"
    first = _start(job(run_dir, sets), first_log)
    try:
        _wait_step(run_dir, 6, first, first_log)  # committed step 5: a --resume auto would find it
        holder = _ranks(first.pid)[0]
        untouched = {n: (run_dir / n).stat().st_mtime_ns for n in ("config.yaml", "ds_config.json", "mlflow_run.json")}
        second = subprocess.run(job(run_dir, sets + ["checkpoint.resume=auto"]), env=cpu_env(), cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        out = second.stdout + second.stderr
        assert second.returncode != 0, out[-3000:]
        assert first.poll() is None, "the first job should still be training: the second did not wait for it"
        assert (f"error: {run_dir} is in use by pid {holder.pid} on host {socket.gethostname()} since"
                in out), out[-3000:]
        assert "wait for it or stop it" in out and "--local_rank=0" in out  # the holder's command
        assert "(rank 1 stops with rank 0)" in out  # rank 1 left by itself, it did not hang
        assert "resumed from" not in out
        assert {n: (run_dir / n).stat().st_mtime_ns for n in untouched} == untouched
        # The first job trains and commits on, undisturbed.
        newest = int(_committed(run_dir)[-1].split("_")[1])
        _wait_step(run_dir, newest + 6, first, first_log)
    finally:
        _kill_job(first)
    steps = [r["step"] for r in _losses(run_dir)]
    assert len(steps) >= 10 and steps == list(range(1, len(steps) + 1))  # each step once, in order


# --- 2. orphan ranks ------------------------------------------------------------------------------

ORPHAN_SETS = ["epochs=4", "max_steps=60", "checkpoint.every_steps=20"]


def _kill_launcher_mid_run(job, run_dir: Path, log: Path) -> None:
    """Start a 2-rank job, SIGKILL its launcher (the `deepspeed` runner, only it) one step past the
    commit at step 20, far from the next one (40); check both ranks stop training at once, their
    processes within seconds, and nothing more is committed."""
    proc = _start(job(run_dir, ORPHAN_SETS), log)
    try:
        _wait_step(run_dir, 21, proc, log)
        ranks = _ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(proc.pid, signal.SIGKILL)
        killed_at, t0 = _progress(run_dir), time.time()
        # Training stops at once (the watch polls every 0.5 s); the processes are gone by the end of
        # the cleanup, at most EXIT_GRACE_S later (a loaded machine spends seconds in the
        # interpreter's teardown alone).
        limit = EXIT_GRACE_S + 5
        while time.time() - t0 < limit + 5 and not all(_gone(p) for p in ranks.values()):
            time.sleep(0.05)
        stopped_after = time.time() - t0
        assert all(_gone(p) for p in ranks.values()), f"ranks still running without their launcher:\n{log.read_text()[-3000:]}"
        assert stopped_after < limit, f"ranks took {stopped_after:.1f} s to stop"
        last = _progress(run_dir)
        # "At once" = within the watch's 0.5 s poll (PDEATHSIG cannot fire: DeepSpeed's
        # intermediate launcher process outlives the runner): on an idle machine a tiny step takes
        # ~0.2 s, so up to a few steps finish in that window; none reaches the next commit (40).
        assert last <= killed_at + 5, f"training went on after the launcher died: step {killed_at} -> {last}"
        assert _committed(run_dir) == ["step_00000020"]  # no new commit, no half step committed
        assert "launcher process" in log.read_text() and "is gone" in log.read_text()
    finally:
        _kill_job(proc)


@pytest.mark.multiproc
def test_ranks_stop_when_the_launcher_is_killed(job, tmp_path):
    _kill_launcher_mid_run(job, tmp_path / "orphan", tmp_path / "orphan.log")


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_after_the_launcher_was_killed_is_bit_identical(job, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "orphan"
    ref = subprocess.run(job(ref_dir, ORPHAN_SETS), env=cpu_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    _kill_launcher_mid_run(job, run_dir, tmp_path / "orphan.log")
    resumed = subprocess.run(job(run_dir, ORPHAN_SETS + ["checkpoint.resume=auto"]), env=cpu_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000020" in resumed.stdout
    ref_losses = _losses(ref_dir)
    assert [r["step"] for r in ref_losses] == list(range(1, 61))
    assert _losses(run_dir) == ref_losses  # every step, every term, bit for bit


# --- 3. a stalled rank ----------------------------------------------------------------------------

@pytest.mark.multiproc
def test_stalled_rank_fails_the_job_naming_the_step_and_the_rank(job, tmp_path):
    run_dir, log = tmp_path / "stall", tmp_path / "stall.log"
    # Setup and commits under the default long timeout (a loaded machine is slow there); steps
    # under 10 s. Stopped one step past the commit at step 5, away from the next one.
    sets = LONG + ["checkpoint.every_steps=5", "distributed.timeout_s=10", "distributed.heartbeat_s=1"]
    proc = _start(job(run_dir, sets), log)
    try:
        _wait_step(run_dir, 6, proc, log)
        ranks = _ranks(proc.pid)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_at, t0 = _progress(run_dir), time.time()
        # The survivor gives up after the 10 s timeout (plus its teardown).
        while time.time() - t0 < 120 and not _gone(ranks[0]):
            time.sleep(0.05)
        waited = time.time() - t0
        assert _gone(ranks[0]), f"rank 0 hung on its stopped peer:\n{log.read_text()[-3000:]}"
        # DeepSpeed's launcher would give the stopped rank 30 s before its SIGKILL; woken up, it
        # finds its peer gone and the job ends at once.
        ranks[1].send_signal(signal.SIGCONT)
        proc.wait(timeout=90)
    finally:
        _kill_job(proc)
    out = log.read_text()
    assert proc.returncode != 0
    assert waited < 45, f"rank 0 took {waited:.0f} s to fail"
    m = re.search(r"pretrain: error: (step|commit of step) (\d+): rank 1 sent nothing for 10 s \(collective timeout\); "
                  r"rank 1 \(pid (\d+) on [^)]+\) last beat (\d+) s ago", out)
    assert m, out[-3000:]
    step, pid, age = int(m.group(2)), int(m.group(3)), int(m.group(4))
    assert stopped_at <= step <= stopped_at + 2 and pid == ranks[1].pid and age >= 9
    assert "last committed checkpoint: " in out and "step_000000" in out


# --- 13b. Ctrl-C ------------------------------------------------------------------------------------

@pytest.mark.multiproc
def test_ctrl_c_marks_the_mlflow_run_killed(job, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, log = tmp_path / "ctrl_c", tmp_path / "ctrl_c.log"
    proc = _start(job(run_dir, LONG + ["checkpoint.every_steps=5"], ranks=1), log)
    try:
        _wait_step(run_dir, 3, proc, log)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (1 rank: the process itself)
        proc.wait(timeout=60)
    finally:
        _kill_job(proc)
    assert proc.returncode != 0
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    run = MlflowClient(tracking_uri=saved["tracking_uri"]).get_run(saved["run_id"])
    assert run.info.status == "KILLED", log.read_text()[-3000:]
    assert "KeyboardInterrupt" in log.read_text()
