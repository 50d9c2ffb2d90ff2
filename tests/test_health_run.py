"""Representation health in real tiny pre-training runs (launch/pretrain.py, 1 rank, CPU):
logged to MLflow and run_dir/health.jsonl at the right steps, equal to a recomputation from the
exported model, unchanged and logged once across a crash and resume, drawn in health.png and shown
by compare_runs; and a run made to collapse on purpose warns loudly while a normal run does not.

The probe here is the training shards themselves (only determinism matters for these tests; real
use holds the probe out, docs/health.md). The thresholds are set to flag complete collapse only
(dim_std below 0.005/sqrt(d)): with the default thresholds every tiny run warns from the first
probe on, as docs/health.md reports.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from launch_helpers import cpu_env, pretrain_argv

REPO = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY, HEALTH_EVERY, PROBE_CELLS = 12, 4, 2, 64
COLLAPSE_ONLY = ["tracking.health_thresholds.min_rankme_fraction=0", "tracking.health_thresholds.max_mean_cos=1",
                 "tracking.health_thresholds.max_top3_var=1", "tracking.health_thresholds.min_dim_std_ratio=0.005"]
# The collapse construct (docs/health.md): no reconstruction term, the teacher a copy of the student
# after every step (EMA momentum 0) and a 10x learning rate. The JEPA loss alone is then minimised
# by mapping every cell to one vector, and nothing slows the way there.
COLLAPSE = ["loss.w_rec=0", "ema.schedule=constant", "ema.base=0", "ema.final=0", "optim.lr=1e-2", "max_steps=16"]


def pretrain(run_dir: Path, shards: Path, vocab: Path, sets: list[str], env: dict | None = None):
    base = [f"run_dir={run_dir}", f"vocab={vocab}", f"data.shards_dir={shards}", f"tracking.probe_shards={shards}",
            f"tracking.probe_cells={PROBE_CELLS}", f"tracking.health_every={HEALTH_EVERY}", f"max_steps={STEPS}",
            f"checkpoint.every_steps={CKPT_EVERY}", "tracking.log_every=3", "tracking.progress=false",
            "deterministic=true", *COLLAPSE_ONLY]
    argv = pretrain_argv(REPO / "configs" / "tiny_cpu.yaml", base + sets)
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=cpu_env(env))


def health_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "health.jsonl").read_text().splitlines() if line]


def mlflow_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    return sorted((m.step, m.value) for m in client.get_metric_history(saved["run_id"], key))


@pytest.fixture(scope="module")
def normal_run(tiny_shards, tmp_path_factory):
    shards, vocab = tiny_shards
    run_dir = tmp_path_factory.mktemp("health_runs") / "normal"
    done = pretrain(run_dir, shards, vocab, [])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return run_dir, done


def test_health_logged_at_every_n_and_commits_and_matches_the_exported_model(normal_run, tiny_shards):
    import torch

    from celljepa_dist.data.collate import collate_cells, to_tensors
    from celljepa_dist.data.shards import read_manifest, read_shard
    from celljepa_dist.model import teacher_embedding
    from celljepa_dist.model.pretrained import from_pretrained, load_encoder

    run_dir, done = normal_run
    records = health_records(run_dir)
    expected_steps = sorted(set(range(HEALTH_EVERY, STEPS + 1, HEALTH_EVERY)) | set(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)))
    assert [r["step"] for r in records] == expected_steps
    assert "COLLAPSE WARNING" not in done.stderr and all(r["warnings"] == 0 for r in records)
    for key in ("student/rankme", "student/mean_cos", "teacher/dim_std", "teacher/top3_var", "jepa_pred_cos", "warnings"):
        assert mlflow_history(run_dir, f"health/{key}") == [(r["step"], pytest.approx(r[key], rel=1e-6))
                                                           for r in records], key

    # The last probe ran on the final weights, which the run exported: recompute it independently.
    shards, _ = tiny_shards
    cells = read_shard(shards / read_manifest(shards)["shards"][0]["name"]).slice(0, PROBE_CELLS)
    # The probe's documented tokens: seed 0, epoch 0, the run's max_genes (128), nothing masked.
    batch = to_tensors(collate_cells(cells.offsets, cells.genes, cells.bins, cells.joinids, seed=0, epoch=0,
                                     max_genes=128, mask_ratio=0.0))
    model = from_pretrained(run_dir / "model").eval()
    with torch.no_grad():
        student = model.embed_cells(batch, normalize=False).double().numpy()
        teacher = teacher_embedding(load_encoder(run_dir / "model", "teacher").eval(), batch).double().numpy()
    last = records[-1]
    for name, x in (("student", student), ("teacher", teacher)):
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = np.linalg.svd(x, compute_uv=False)
        p = s / s.sum() + 1e-7
        cos = u @ u.T
        assert last[f"{name}/rankme"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
        assert last[f"{name}/mean_cos"] == pytest.approx((cos.sum() - np.trace(cos)) / (len(x) * (len(x) - 1)), rel=1e-4)
        assert last[f"{name}/dim_std"] == pytest.approx(float(u.std(axis=0).mean()), rel=1e-3)


def test_health_png_artifact_and_compare_runs(normal_run):
    from mlflow.tracking import MlflowClient

    from celljepa_dist.compare import compare_runs, render_markdown

    run_dir, _ = normal_run
    png = run_dir / "health.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    assert "health.png" in {a.path for a in client.list_artifacts(saved["run_id"])}
    markdown = render_markdown(compare_runs(saved["tracking_uri"], saved["experiment"], [saved["run_id"]]))
    last = health_records(run_dir)[-1]
    for key in ("student/rankme", "teacher/mean_cos", "jepa_pred_cos", "warnings"):
        assert f"`health/{key}`" in markdown
    assert f"{last['student/rankme']:.4g}" in markdown


def test_crash_before_commit_then_resume_gives_the_same_health_logged_once(normal_run, tiny_shards, tmp_path):
    shards, vocab = tiny_shards
    ref_dir, _ = normal_run
    run_dir = tmp_path / "crashed"
    # Killed after the step-8 save flushed metrics and health.jsonl, before its commit marker: the
    # resume restarts from step 4 and recomputes health at 6 and 8, which must not be logged twice
    # (the loss was last logged at step 6, log_every=3: health keeps its own high-water mark).
    crashed = pretrain(run_dir, shards, vocab, [], env={"CELLJEPA_KILL_BEFORE_COMMIT": "8"})
    assert crashed.returncode != 0
    assert [r["step"] for r in health_records(run_dir)][-1] == 8
    resumed = pretrain(run_dir, shards, vocab, ["checkpoint.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step_00000004" in resumed.stdout
    assert health_records(run_dir) == health_records(ref_dir)  # every value, bit for bit
    steps = [s for s, _ in mlflow_history(run_dir, "health/student/rankme")]
    assert steps == [r["step"] for r in health_records(ref_dir)]


def test_collapse_run_warns_loudly_and_counts_warnings(tiny_shards, tmp_path):
    shards, vocab = tiny_shards
    run_dir = tmp_path / "collapse"
    done = pretrain(run_dir, shards, vocab, COLLAPSE)
    assert done.returncode == 0, done.stderr[-4000:]  # a warning, not a stop
    records = health_records(run_dir)
    last = records[-1]
    assert last["step"] == 16 and last["warnings"] >= 2  # student and teacher (one network: momentum 0)
    d = 64
    assert last["student/dim_std"] < 0.005 / np.sqrt(d) and last["teacher/dim_std"] < 0.005 / np.sqrt(d)
    assert "REPRESENTATION COLLAPSE WARNING at step 16" in done.stderr
    block = done.stderr[done.stderr.index("REPRESENTATION COLLAPSE WARNING at step 16"):]
    assert f"student <cls>: dim_std = {last['student/dim_std']:.4g} < {0.005 / np.sqrt(d):.4g}" in block
    warned_steps = [s for s, v in mlflow_history(run_dir, "health/warnings") if v > 0]
    assert warned_steps == [r["step"] for r in records if r["warnings"] > 0] and 16 in warned_steps
    assert done.stderr.count("REPRESENTATION COLLAPSE WARNING") == len(warned_steps)


def test_the_probe_leaves_training_unchanged(normal_run, tiny_shards, tmp_path):
    from safetensors.torch import load_file

    shards, vocab = tiny_shards
    ref_dir, _ = normal_run
    off_dir = tmp_path / "health_off"
    done = pretrain(off_dir, shards, vocab, ["tracking.health_every=0"])
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (off_dir / "health.jsonl").exists() and not (off_dir / "health.png").exists()
    assert (off_dir / "losses.jsonl").read_text() == (ref_dir / "losses.jsonl").read_text()
    a, b = load_file(str(off_dir / "model" / "model.safetensors")), load_file(str(ref_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
