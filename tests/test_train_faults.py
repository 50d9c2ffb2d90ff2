"""Fault tolerance of real 2-rank CPU pre-training runs (deepspeed launcher, gloo, fp32).

* SIGKILL of the whole job mid-epoch, then `--resume auto`: the same per-step losses and
  bit-identical final student and teacher weights as an uninterrupted run; the MLflow run is
  continued with every step logged exactly once.
* SIGKILL inside a save (after every rank wrote its files, before the commit marker): the resume
  starts from the previous committed checkpoint.
* Resume requested with nothing committed: an error, never a silent fresh start.
* A non-finite loss stops the run before the optimiser step, naming the step as losses.jsonl
  numbers it, with the committed checkpoints intact.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import assert_bit_identical, cpu_env, kill_job_at_step, pretrain_argv

REPO = Path(__file__).resolve().parents[1]


def _cmd(config: Path, run_dir: Path, shards: Path, vocab: Path, sets: list[str], ranks: int = 2) -> list[str]:
    return pretrain_argv(config, [f"run_dir={run_dir}", f"vocab={vocab}", f"data.shards_dir={shards}", *sets],
                         ranks=ranks, launcher=True)


def _env(extra: dict | None = None) -> dict:
    return cpu_env(extra)


def _shm_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def run_job(cmd, extra_env=None, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(extra_env), cwd=REPO, capture_output=True, text=True, timeout=timeout)


BATCH, RANKS = 8, 2
FAULT_SETS = ["epochs=2", f"data.batch_size={BATCH}", "checkpoint.every_steps=10", "checkpoint.keep_last=2",
              "deterministic=true", "deepspeed.zero_stage=1", "tracking.progress=false"]
def steps_per_epoch(shards: Path) -> int:
    """Batches per rank per epoch (the loader drops the < world x batch tail)."""
    return json.loads((shards / "manifest.json").read_text())["total_cells"] // (BATCH * RANKS)


@pytest.fixture
def fault_setup(tiny_shards, tmp_path):
    shards, vocab = tiny_shards
    assert steps_per_epoch(shards) >= 16  # the kill points below need room
    return REPO / "configs" / "tiny_cpu.yaml", shards, vocab, tmp_path


def _final_weights(run_dir: Path, total_steps: int) -> tuple[dict, dict]:
    """fp32 student reconstructed by DeepSpeed's own zero_to_fp32; teacher from its files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = run_dir / "checkpoints" / f"step_{total_steps:08d}"
    student = get_fp32_state_dict_from_zero_checkpoint(str(d / "engine"), tag="engine")
    teacher = {}
    for f in sorted((d / "teacher").glob("*.pt")):
        saved = torch.load(f, map_location="cpu", weights_only=True)
        if "state_dict" in saved:
            teacher.update(saved["state_dict"])
        else:  # ZeRO-3: this rank's flat shard of every parameter
            teacher.update({f"{f.stem}.{i}": t for i, t in enumerate(saved["shards"])})
    return student, teacher


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def _mlflow_steps(run_dir: Path, key: str = "loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    return sorted(m.step for m in client.get_metric_history(saved["run_id"], key))


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(fault_setup, stage):
    config, shards, vocab, tmp = fault_setup
    ref_dir, kill_dir = tmp / "ref", tmp / "killed"
    sets = [s for s in FAULT_SETS if not s.startswith("deepspeed.zero_stage")] + [f"deepspeed.zero_stage={stage}"]
    per_epoch = steps_per_epoch(shards)
    total = 2 * per_epoch

    shm_before = _shm_buffers()
    ref = run_job(_cmd(config, ref_dir, shards, vocab, sets))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    # Kill the whole job (both ranks and the launcher) once step 13 is done: mid-epoch 0,
    # 3 steps past the committed checkpoint at step 10.
    killed_at = kill_job_at_step(_cmd(config, kill_dir, shards, vocab, sets), kill_dir, step=13)
    # DeepSpeed's CPU all-reduce segments (69 MB per rank in /dev/shm, i.e. RAM) must not outlive
    # the run, even a SIGKILLed one: each rank unlinks its own right after init.
    assert _shm_buffers() - shm_before == set(), "a run left DeepSpeed shm segments in /dev/shm"
    assert 13 <= killed_at < per_epoch, f"killed at step {killed_at}: not mid-epoch past the checkpoint"
    committed = sorted(p.parent.name for p in (kill_dir / "checkpoints").glob("*/COMMITTED"))
    assert committed == ["step_00000010"]
    run_id_before = json.loads((kill_dir / "mlflow_run.json").read_text())["run_id"]

    resumed = run_job(_cmd(config, kill_dir, shards, vocab, sets + ["checkpoint.resume=auto"]))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000010" in resumed.stdout

    ref_losses, got_losses = _losses(ref_dir), _losses(kill_dir)
    assert [r["step"] for r in ref_losses] == list(range(1, total + 1))
    assert got_losses == ref_losses  # every step, every term, bit for bit (JSON floats round-trip)
    ref_student, ref_teacher = _final_weights(ref_dir, total)
    got_student, got_teacher = _final_weights(kill_dir, total)
    assert_bit_identical(ref_student, got_student, "student")
    assert_bit_identical(ref_teacher, got_teacher, "teacher")
    if stage != 3:  # the teacher lags the student (EMA), so comparing both is not redundant
        assert not torch.equal(ref_teacher["embed.gene.embedding.weight"],
                               ref_student["student.embed.gene.embedding.weight"])

    # Same MLflow run, each step once; keep-last-2 pruning left the newest two committed.
    assert json.loads((kill_dir / "mlflow_run.json").read_text())["run_id"] == run_id_before
    assert _mlflow_steps(kill_dir) == list(range(1, total + 1))
    assert _mlflow_steps(ref_dir) == list(range(1, total + 1))
    committed = sorted(p.parent.name for p in (kill_dir / "checkpoints").glob("*/COMMITTED"))
    saves = sorted(set(range(10, total + 1, 10)) | {total})
    assert committed == [f"step_{n:08d}" for n in saves[-2:]]
    assert (kill_dir / "config.yaml").exists() and (kill_dir / "ds_config.json").exists()
    _check_export(kill_dir, total, stage, ref_student, ref_teacher)


def _check_export(run_dir: Path, step: int, stage: int, ref_student: dict, ref_teacher: dict) -> None:
    """The run's own export (RUN_DIR/model) loads with from_pretrained, equals the final
    checkpoint bit for bit, and launch/export.py writes the same weights offline."""
    from safetensors.torch import load_file

    from celljepa_dist.data.vocab import GeneVocab
    from celljepa_dist.model.pretrained import from_pretrained, load_encoder, load_meta

    model_dir = run_dir / "model"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["model"] == str(model_dir) and result["checkpoint"].endswith(f"step_{step:08d}")
    meta = load_meta(model_dir)
    assert meta["source"]["step"] == step and meta["source"]["zero_stage"] == stage
    assert meta["vocab_sha256"] == GeneVocab.load(run_dir / "vocab.json").sha256
    assert meta["data"]["max_genes"] > 0 and meta["data"]["n_bins"] == meta["model"]["n_bins"]
    model = from_pretrained(model_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_student[k]), f"exported student {k} differs from zero_to_fp32"
    teacher = load_encoder(model_dir, "teacher").state_dict()
    if stage != 3:
        assert teacher.keys() == ref_teacher.keys()
        for k in ref_teacher:
            assert torch.equal(teacher[k], ref_teacher[k]), f"exported teacher {k} differs from the checkpoint's"
    else:  # the flat shards, in rank order, are the parameters (the teacher worker test checks
        # the same consolidation against DeepSpeed's own gather)
        for i, (k, v) in enumerate(teacher.items()):
            flat = torch.cat([ref_teacher[f"shard_rank{r:03d}.{i}"] for r in range(RANKS)])
            assert torch.equal(v.reshape(-1), flat[: v.numel()]), k
    offline = run_dir.parent / f"{run_dir.name}_exported"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), "--checkpoint", str(run_dir),
                           "--out", str(offline)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "teacher.safetensors"):
        a, b = load_file(str(model_dir / name)), load_file(str(offline / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.multiproc
def test_kill_during_save_resumes_from_previous_commit(fault_setup):
    config, shards, vocab, tmp = fault_setup
    run_dir = tmp / "run"
    sets = FAULT_SETS + ["epochs=1", "checkpoint.every_steps=6"]
    crashed = run_job(_cmd(config, run_dir, shards, vocab, sets), extra_env={"CELLJEPA_KILL_BEFORE_COMMIT": "12"})
    assert crashed.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_00000006" / "COMMITTED").exists()
    half = ckpts / "step_00000012"
    assert half.is_dir() and (half / "rank_0.pt").exists() and (half / "rank_1.pt").exists()
    assert not (half / "COMMITTED").exists()

    resumed = run_job(_cmd(config, run_dir, shards, vocab, sets + ["checkpoint.resume=auto"]))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000006" in resumed.stdout
    n = steps_per_epoch(shards)
    assert [r["step"] for r in _losses(run_dir)] == list(range(1, n + 1))
    assert (ckpts / f"step_{n:08d}" / "COMMITTED").exists()


@pytest.mark.multiproc
def test_resume_without_committed_checkpoint_is_an_error(fault_setup):
    config, shards, vocab, tmp = fault_setup
    run_dir = tmp / "nothing"
    (run_dir / "checkpoints" / "step_00000005").mkdir(parents=True)  # an uncommitted leftover
    proc = run_job(_cmd(config, run_dir, shards, vocab, FAULT_SETS + ["checkpoint.resume=auto"], ranks=1))
    assert proc.returncode != 0
    assert "no committed checkpoint" in proc.stdout + proc.stderr
    assert not (run_dir / "losses.jsonl").exists()  # nothing trained


def test_fresh_start_over_committed_checkpoints_is_refused(fault_setup):
    """Without --resume, a run dir that already holds a committed checkpoint is not overwritten."""
    config, shards, vocab, tmp = fault_setup
    run_dir = tmp / "taken"
    done = run_dir / "checkpoints" / "step_00000003"
    done.mkdir(parents=True)
    (done / "COMMITTED").write_text("{}")
    proc = run_job(_cmd(config, run_dir, shards, vocab, FAULT_SETS, ranks=1))
    assert proc.returncode != 0 and "already holds committed checkpoints" in proc.stdout + proc.stderr
    assert (done / "COMMITTED").exists()


@pytest.mark.multiproc
def test_nonfinite_loss_stops_before_the_step_with_checkpoints_intact(fault_setup):
    config, shards, vocab, tmp = fault_setup
    run_dir = tmp / "nan"
    # An absurd learning rate blows the weights up at the first step; step 2's loss is not finite.
    sets = FAULT_SETS + ["epochs=1", "checkpoint.every_steps=1", "optim.lr=1e30", "optim.grad_clip=0"]
    proc = run_job(_cmd(config, run_dir, shards, vocab, sets))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite" in out and "stopped before the optimiser step" in out
    # The step is numbered as losses.jsonl numbers steps: the one after the last logged.
    failed_at = int(re.search(r"non-finite \S+.* at step (\d+) \(numbered as in losses.jsonl", out).group(1))
    assert [r["step"] for r in _losses(run_dir)] == [1] and failed_at == 2
    committed = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("*/COMMITTED"))
    assert committed == ["step_00000001"]
    state = json.loads((run_dir / "checkpoints" / "step_00000001" / "train_state.json").read_text())
    assert state["step"] == 1
