"""Checkpoint faults of real pre-training runs (launch/pretrain.py, CPU DeepSpeed, local MLflow):

* a finished run resumed again changes nothing (result.json, checkpoints, losses, MLflow);
* a resume with another model size is refused before DeepSpeed loads anything, naming the keys,
  with or without --allow-config-change;
* max_steps beyond what the epochs hold is a warning naming both;
* a corrupt newest checkpoint (truncated engine file, garbled rank_1.pt) is detected by its
  checksums: --resume auto falls back to the newest intact one and reproduces the uninterrupted
  run bit for bit; a named corrupt checkpoint is an error naming the file;
* a full disk during a save (a real EFBIG from the kernel through RLIMIT_FSIZE) is reported as
  the checkpoint save failing, with the path and the free space, before anything MLflow says.
"""
from __future__ import annotations

import json
import re
import resource
import subprocess
from pathlib import Path

import pytest
from launch_helpers import cpu_env, pretrain_argv

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def _launch(run_dir: Path, shards: Path, vocab: Path, sets: list[str], extra_args: list[str] = (), ranks: int = 1,
            preexec_fn=None) -> subprocess.CompletedProcess:
    argv = pretrain_argv(CONFIG, [f"run_dir={run_dir}", f"vocab={vocab}", f"data.shards_dir={shards}",
                                  "tracking.progress=false", *sets], ranks=ranks) + list(extra_args)
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=cpu_env(),
                          preexec_fn=preexec_fn)


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _committed(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("*/COMMITTED"))


def _mlflow_points(run_dir: Path) -> dict[str, list[tuple[int, float, int]]]:
    """Every metric point of the run's MLflow record: (step, value, timestamp) per key."""
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(saved["tracking_uri"])
    keys = client.get_run(saved["run_id"]).data.metrics
    return {k: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(saved["run_id"], k))
            for k in keys}


# What every job writes about itself while it lives, refused or not: the run-dir lock's holder and
# the ranks' heartbeats (train/run_lock.py, train/heartbeat.py). Not the run's results.
JOB_BOOKKEEPING = (".lock", ".heartbeat/")


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run under d: (size, mtime_ns): a rewrite of any of them shows."""
    files = (p for p in sorted(d.rglob("*")) if p.is_file())
    return {p.relative_to(d).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in files
            if not p.relative_to(d).as_posix().startswith(JOB_BOOKKEEPING)}


# 311 cells / 64 per batch on one rank: 4 steps per epoch; max_steps asks for more.
FINISHED_SETS = ["epochs=1", "max_steps=100", "data.batch_size=64", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory):
    shards, vocab = tiny_shards
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    out = _ok(_launch(run_dir, shards, vocab, FINISHED_SETS))
    return run_dir, shards, vocab, out


@pytest.mark.multiproc
def test_max_steps_beyond_the_epochs_is_a_warning(finished_run):
    run_dir, _, _, out = finished_run
    assert "WARNING: max_steps=100 but epochs=1 allow only 4 steps" in out and "the run stops at 4" in out
    assert json.loads((run_dir / "result.json").read_text())["final_step"] == 4


@pytest.mark.multiproc
def test_resuming_a_finished_run_changes_nothing(finished_run):
    run_dir, shards, vocab, _ = finished_run
    result = (run_dir / "result.json").read_bytes()
    assert json.loads(result)["checkpoint"].endswith("step_00000004")
    checkpoints, model = _tree(run_dir / "checkpoints"), _tree(run_dir / "model")
    losses, points = (run_dir / "losses.jsonl").read_bytes(), _mlflow_points(run_dir)
    assert {"loss", "final/loss", "data/skipped_cells"} <= points.keys()

    out = _ok(_launch(run_dir, shards, vocab, FINISHED_SETS, ["--resume", "auto"]))
    assert "resumed from" in out and "step_00000004" in out
    assert (run_dir / "result.json").read_bytes() == result
    assert _tree(run_dir / "checkpoints") == checkpoints  # no new checkpoint, none rewritten
    assert _tree(run_dir / "model") == model  # the export of that checkpoint is not redone
    assert (run_dir / "losses.jsonl").read_bytes() == losses
    assert _mlflow_points(run_dir) == points  # no point logged twice (final/* included)


@pytest.mark.multiproc
@pytest.mark.parametrize("allow", [False, True])
def test_resume_with_another_model_size_is_refused_naming_the_key(finished_run, allow):
    run_dir, shards, vocab, _ = finished_run
    before = _tree(run_dir)
    extra = ["--resume", "auto"] + (["--allow-config-change"] if allow else [])
    proc = _launch(run_dir, shards, vocab, FINISHED_SETS + ["model.d_model=128", "model.d_hid=128"], extra)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "model.d_model: checkpoint 64, now 128" in out and "model.d_hid: checkpoint 64, now 128" in out
    if allow:  # a shape change can never be allowed
        assert "--allow-config-change included" in out and "shapes of" in out
    assert "size mismatch" not in out  # refused before DeepSpeed loaded anything
    assert "resumed from" not in out
    assert _tree(run_dir) == before


# 2 ranks x 8 cells: 19 steps per epoch; checkpoints at 3 and 6 (keep-last 2), the run ends at 6.
CORRUPT_SETS = ["epochs=1", "max_steps=6", "data.batch_size=8", "checkpoint.every_steps=3", "checkpoint.keep_last=2",
                "deterministic=true", "deepspeed.zero_stage=1"]


def _resumed_from(out: str) -> str:
    return Path(re.search(r"^resumed from (\S+) at step", out, re.M).group(1)).name


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_intact_one(tiny_shards, tmp_path):
    shards, vocab = tiny_shards
    run_dir = tmp_path / "run"
    _ok(_launch(run_dir, shards, vocab, CORRUPT_SETS, ranks=2))
    assert _committed(run_dir) == ["step_00000003", "step_00000006"]
    reference = _losses(run_dir)  # the uninterrupted run
    assert [r["step"] for r in reference] == list(range(1, 7))
    newest = run_dir / "checkpoints" / "step_00000006"
    engine_file = newest / "engine" / "engine" / "mp_rank_00_model_states.pt"
    rank1_file = newest / "rank_1.pt"

    # A truncated engine file (a node died while the page cache was flushed, a copy cut short).
    engine_file.write_bytes(engine_file.read_bytes()[: engine_file.stat().st_size // 2])
    out = _ok(_launch(run_dir, shards, vocab, CORRUPT_SETS, ["--resume", "auto"], ranks=2))
    assert "WARNING: checkpoint step_00000006: engine/engine/mp_rank_00_model_states.pt: size mismatch" in out
    assert _resumed_from(out) == "step_00000003"
    assert _losses(run_dir) == reference  # steps 4-6 recomputed bit for bit
    assert _committed(run_dir) == ["step_00000003", "step_00000006"]

    # A garbled per-rank file of the other rank (same size): rank 1's share of the verification.
    data = bytearray(rank1_file.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    rank1_file.write_bytes(bytes(data))
    out = _ok(_launch(run_dir, shards, vocab, CORRUPT_SETS, ["--resume", "auto"], ranks=2))
    assert "WARNING: checkpoint step_00000006: rank_1.pt: checksum mismatch (expected sha256" in out
    assert _resumed_from(out) == "step_00000003"
    assert _losses(run_dir) == reference

    # A named corrupt checkpoint: an error naming the file, nothing trained.
    engine_file.write_bytes(b"garbage")
    before = (run_dir / "losses.jsonl").read_bytes()
    proc = _launch(run_dir, shards, vocab, CORRUPT_SETS, ["--resume", str(newest)])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "checkpoint step_00000006: engine/engine/mp_rank_00_model_states.pt: size mismatch" in out
    assert "failed finding central directory" not in out and "resumed from" not in out
    assert (run_dir / "losses.jsonl").read_bytes() == before


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG, as on a full disk (no root needed;
    Python ignores SIGXFSZ, so the write returns the error instead of killing the process)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.multiproc
def test_full_disk_during_a_save_names_the_checkpoint_and_the_free_space(tiny_shards, tmp_path):
    shards, vocab = tiny_shards
    run_dir = tmp_path / "full"
    # The optimiser states (~2.4 MB) are the first file past the limit: the step-2 save fails.
    proc = _launch(run_dir, shards, vocab, ["max_steps=4", "checkpoint.every_steps=2"],
                   preexec_fn=_file_size_limit(1_500_000))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    step_dir = run_dir / "checkpoints" / "step_00000002"
    message = f"checkpoint save to {step_dir} failed: "
    assert message in out and "free space on that filesystem: " in out, out[-4000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("pretrain: error: ") and message in last_line  # what the run died of
    if "disk is full" in out:  # MLflow failing on the same disk comes after, as a warning
        assert out.index(message) < out.index("disk is full")
    assert not (step_dir / "COMMITTED").exists() and _committed(run_dir) == []
