"""The process-level fault pieces on their own (docs/training.md, "Faults"): the run-dir lock between two
real processes, the launcher watch on a real process chain, collective timeouts on a real 2-rank
gloo group, the failure message, the config section. The end-to-end launches are in
tests/test_train_faults_run.py."""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from celljepa_dist.config import ConfigError, load_config
from celljepa_dist.launching import free_port
from celljepa_dist.train.collectives import describe_failure
from celljepa_dist.train.heartbeat import Heartbeat, read_heartbeats, silent_rank
from celljepa_dist.train.interrupts import Terminated, end_status
from celljepa_dist.train.run_lock import describe_holder, lock_path, try_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _gone(p: psutil.Process) -> bool:
    """Exited (a zombie nobody reaped counts: the container's pid 1 may not reap orphans)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs, timeout: float) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.1)
    return [p for p in procs if not _gone(p)]


def _wait_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    line = proc.stdout.readline()
    assert time.time() < deadline and line, f"no output from {proc.args}"
    return line.strip()


# --- run lock ------------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from celljepa_dist.train.run_lock import try_lock
    refusal = try_lock(sys.argv[1])
    print("refused: " + refusal if refusal else "held", flush=True)
    time.sleep(float(sys.argv[2]) if refusal is None else 0)  # holding it that long
""")


@pytest.mark.multiproc
def test_run_lock_refuses_a_second_process_naming_the_holder_and_frees_on_death(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), "600", "--tag=first"], env=ENV, cwd=REPO,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert _wait_line(first) == "held"
        ident = json.loads(lock_path(run_dir).read_text())
        assert ident["pid"] == first.pid and ident["host"] == socket.gethostname()
        assert "--tag=first" in ident["command"]
        second = subprocess.run([sys.executable, "-c", HOLD, str(run_dir), "0"], env=ENV, cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        assert second.stdout.startswith(f"refused: error: {run_dir} is in use by pid {first.pid} on host "
                                        f"{socket.gethostname()} since {ident['since']}")
        assert "--tag=first" in second.stdout and second.stdout.strip().endswith("wait for it or stop it")
        # This process may take it as often as it likes (reentrant), not while `first` holds it.
        assert try_lock(run_dir) is not None
        first.kill()  # SIGKILL: no cleanup runs, the kernel releases the lock
        first.wait(timeout=30)
        third = subprocess.run([sys.executable, "-c", HOLD, str(run_dir), "0"], env=ENV, cwd=REPO, capture_output=True,
                               text=True, timeout=60)
        assert third.stdout.strip() == "held", third.stdout + third.stderr
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)


def test_run_lock_message_names_slurm_job_and_handles_an_unknown_holder():
    ident = {"pid": 7, "host": "n1", "since": "2026-01-01T00:00:00+00:00", "command": "pretrain.py --x",
             "parent_pid": 6, "slurm_job_id": "123"}
    msg = describe_holder("/runs/a", ident)
    assert msg == ("error: /runs/a is in use by pid 7 on host n1 since 2026-01-01T00:00:00+00:00 (SLURM job 123, "
                   "launcher pid 6, command: pretrain.py --x); wait for it or stop it")
    assert "in use by another job" in describe_holder("/runs/a", None)


# --- launcher watch ------------------------------------------------------------------------------

# A stand-in launcher whose command line carries a launcher marker ("torchrun"): it starts a "rank"
# that watches its launcher chain, prints its pid and trains (sleeps) forever.
RANK = textwrap.dedent("""
    import time
    from celljepa_dist.train.interrupts import install
    from celljepa_dist.train.launcher_watch import watch_launcher
    install()
    links = watch_launcher()
    print(len(links), flush=True)
    try:
        time.sleep(600)
    except BaseException as e:
        print(type(e).__name__, flush=True)
        raise
""")
LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    print(rank.pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.multiproc
@pytest.mark.parametrize("outer", [False, True], ids=["parent-killed", "grandparent-killed"])
def test_rank_stops_when_any_launcher_process_is_killed(tmp_path, outer):
    """deepspeed: runner -> launch.py -> rank. Killing launch.py (the parent) is PDEATHSIG's case;
    killing the runner above it is only seen by the watch thread."""
    out = tmp_path / "rank.out"
    inner_cmd = [sys.executable, "-c", LAUNCHER, RANK, "torchrun"]
    outer_cmd = [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])", *inner_cmd,
                 "deepspeed.launcher.runner"]
    top = subprocess.Popen(outer_cmd if outer else inner_cmd, env=ENV, cwd=REPO, stdout=open(out, "w"),
                           start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(out.read_text().split()) < 2:
            time.sleep(0.05)
        rank_pid, n_links = map(int, out.read_text().split()[:2])
        assert n_links == (2 if outer else 1)  # the rank watches every launcher process above it
        rank = psutil.Process(rank_pid)
        assert not _gone(rank)
        top.kill()  # SIGKILL of the top launcher only; with `outer` its child (the inner launcher) lives on
        top.wait(timeout=30)
        t0 = time.time()
        assert _wait_gone([rank], 10) == [], "the rank kept running without its launcher"
        assert time.time() - t0 < 5
        assert out.read_text().split()[2] == "Terminated"  # stopped through SIGTERM -> Terminated
    finally:
        os.killpg(top.pid, signal.SIGKILL)


def test_rank_without_launcher_is_not_watched():
    from celljepa_dist.train.launcher_watch import is_launcher, launcher_links

    assert launcher_links() == []  # pytest's parent is a shell or CI runner, not a launcher
    assert is_launcher("/venv/bin/python -u -m deepspeed.launcher.launch --world_info=e30=")
    assert is_launcher("/venv/bin/torchrun --nproc_per_node 2 launch/pretrain.py")
    assert not is_launcher("/bin/bash -c nohup python launch/pretrain.py")


# --- collective timeouts -------------------------------------------------------------------------

GLOO_RANK = textwrap.dedent("""
    import datetime, sys, time
    import torch, torch.distributed as dist
    from celljepa_dist.train.collectives import collective_timeout, set_timeout
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    sub = dist.new_group([0, 1])  # like DeepSpeed's groups: torch gives it 30 min, not the world's 60 s
    set_timeout(2)
    dist.barrier(group=sub)
    # Rank 1 is 4 s late: inside a 30 s window rank 0 waits for it ...
    if rank == 1:
        time.sleep(4)
    with collective_timeout(30, 2, "commit of step 1"):
        dist.barrier(group=sub)
    print(rank, "window ok", flush=True)
    # ... outside it, 2 s is all it gets, in the world group and in the subgroup.
    t0 = time.time()
    if rank == 1:
        time.sleep(8)
    for group in (None, sub):
        try:
            dist.all_reduce(torch.ones(1), group=group)
            print(rank, "no timeout", flush=True)
        except RuntimeError as e:
            print(rank, "timeout after %.1f s" % (time.time() - t0), flush=True)
            t0 = time.time()
""")


@pytest.mark.multiproc
def test_collective_timeout_applies_to_every_group_and_widens_inside_a_window(tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", GLOO_RANK, str(r), port], env=ENV, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    lines = [ln for ln in outs[0].splitlines() if ln.startswith("0 ")]
    assert lines[0] == "0 window ok", outs[0][-3000:]
    # world group and subgroup each time out after ~2 s (not 60 s, not 30 min)
    waits = [float(ln.split()[3]) for ln in lines[1:]]
    assert len(waits) == 2 and all(1.5 < w < 6 for w in waits), lines


def test_failure_message_names_the_step_the_silent_rank_and_the_checkpoint():
    now = 1000.0
    beats = {0: {"rank": 0, "step": 13, "time": 999.0, "pid": 10, "host": "a"},
             1: {"rank": 1, "step": 12, "time": 988.0, "pid": 11, "host": "b"},
             2: {"rank": 2, "step": 13, "time": 999.5, "pid": 12, "host": "c"}}
    exc = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation")
    msg = describe_failure(exc, where="step 14", timeout_s=10, rank=0, beats=beats, heartbeat_s=1, now=now,
                           last_commit=Path("run/checkpoints/step_00000010"))
    assert msg == ("step 14: rank 1 sent nothing for 10 s (collective timeout); rank 1 (pid 11 on b) last beat 12 s "
                   "ago at step 12; last committed checkpoint: run/checkpoints/step_00000010 (--resume auto continues "
                   "there)")
    # a rank that never wrote a heartbeat is the first suspect; a dead peer is named as gone
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")
    msg = describe_failure(gone, where="commit of step 10", timeout_s=1800, rank=1, beats={**beats, 2: None},
                           heartbeat_s=1, now=now, last_commit=None)
    assert msg.startswith("commit of step 10: rank 2 is gone") and "never wrote a heartbeat" in msg
    assert msg.endswith("last committed checkpoint: none (--resume auto continues there)")
    # every heartbeat recent (12 s < 3 beats of 10 s): nobody is stopped, the peer is elsewhere
    msg = describe_failure(exc, where="step 14", timeout_s=10, rank=0, beats=beats, heartbeat_s=10, now=now,
                           last_commit=None)
    assert msg.startswith("step 14: no answer within 10 s (collective timeout), yet every rank's heartbeat is recent: "
                          "rank 1 is alive but did not join")
    assert describe_failure(ValueError("Timed out"), where="step 1", timeout_s=1, rank=0, beats=beats, heartbeat_s=1,
                            now=now, last_commit=None) is None


def test_heartbeats_are_written_by_a_thread_with_the_step_reached(tmp_path):
    hb = Heartbeat(tmp_path, rank=1, every_s=0.05).start()
    try:
        hb.step = 7
        time.sleep(0.3)
        beats = read_heartbeats(tmp_path, 3)
    finally:
        hb.stop()
    assert beats[1]["step"] == 7 and beats[1]["pid"] == os.getpid() and time.time() - beats[1]["time"] < 1
    assert beats[0] is None and beats[2] is None
    assert silent_rank(beats, me=1)[0] == 0
    assert silent_rank({0: beats[1]}, me=0) is None


def test_end_status_kills_on_interrupts_and_fails_otherwise():
    assert end_status(KeyboardInterrupt()) == "KILLED"
    assert end_status(Terminated(signal.SIGTERM)) == "KILLED"
    assert end_status(RuntimeError("boom")) == "FAILED"
    assert "SIGTERM" in str(Terminated())


# --- config --------------------------------------------------------------------------------------

def test_distributed_section_defaults_and_validation():
    tiny = REPO / "configs" / "tiny_cpu.yaml"
    cfg = load_config(tiny)
    assert (cfg.distributed.timeout_s, cfg.distributed.commit_timeout_s, cfg.distributed.heartbeat_s) == (300, 1800, 10)
    assert datetime.timedelta(seconds=cfg.distributed.timeout_s) < datetime.timedelta(minutes=30)
    with pytest.raises(ConfigError, match="distributed.commit_timeout_s"):
        load_config(tiny, ["distributed.timeout_s=60", "distributed.commit_timeout_s=30"])
    with pytest.raises(ConfigError, match="distributed.heartbeat_s"):
        load_config(tiny, ["distributed.timeout_s=10", "distributed.heartbeat_s=5"])
    with pytest.raises(ConfigError, match="distributed.timeout_s"):
        load_config(tiny, ["distributed.timeout_s=0"])
