"""The training state and the same-run check of a resume (train/state.py), on pure inputs and on
a real 1-rank run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launch_helpers import cpu_env, pretrain_argv

from celljepa_dist.config import flatten, load_config
from celljepa_dist.train.pretrain_task import PRETRAIN_DATA_KEYS
from celljepa_dist.train.state import TrainState, config_fingerprint, fingerprint_differences

REPO = Path(__file__).resolve().parents[1]


def _fingerprint(*overrides):
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", list(overrides))
    return json.loads(json.dumps(config_fingerprint(flatten(cfg), "abc", {"total_cells": 311}, 38, PRETRAIN_DATA_KEYS)))


def test_fingerprint_keeps_what_defines_the_run_and_ignores_knobs():
    base = _fingerprint()
    for knob in ("data.num_workers=2", "deepspeed.zero_stage=3", "deepspeed.precision=bf16",
                 "checkpoint.every_steps=7", "tracking.log_every=5", "model.attention_backend=reference",
                 "run_dir=elsewhere"):
        assert fingerprint_differences(base, _fingerprint(knob)) == [], knob
    for change, key in (("model.d_model=128", "model.d_model"), ("objective=scgpt", "objective"),
                        ("epochs=3", "epochs"), ("ema.base=0.99", "ema.base"), ("data.max_genes=64", "data.max_genes"),
                        ("optim.lr=0.1", "optim.lr"), ("seed=5", "seed")):
        assert key in [k for k, _, _ in fingerprint_differences(base, _fingerprint(change))], change


def test_train_state_round_trip_and_ema_step_check():
    state = TrainState(step=7, epoch=1, batches_done=3, total_steps=40, fingerprint={"a": 1})
    saved = json.loads(json.dumps(state.state_dict()))
    assert saved["ema_step"] == 7 and saved["total_steps"] == 40
    fresh = TrainState(total_steps=40)
    fresh.load_state_dict(saved)
    assert (fresh.step, fresh.epoch, fresh.batches_done) == (7, 1, 3)
    with pytest.raises(ValueError, match="ema_step 6 != step 7"):
        fresh.load_state_dict({**saved, "ema_step": 6})


def _pretrain(run_dir: Path, shards: Path, vocab: Path, *sets: str, resume: bool = False) -> subprocess.CompletedProcess:
    argv = pretrain_argv(REPO / "configs" / "tiny_cpu.yaml",
                         [f"run_dir={run_dir}", f"vocab={vocab}", f"data.shards_dir={shards}", "tracking.progress=false",
                          "checkpoint.every_steps=2", *sets])
    if resume:
        argv += ["--resume", "auto"]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=cpu_env())


@pytest.mark.multiproc
def test_resume_with_another_schedule_is_refused_unless_allowed(tiny_shards, tmp_path):
    shards, vocab = tiny_shards
    run_dir = tmp_path / "run"
    first = _pretrain(run_dir, shards, vocab, "max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    # Skip counters of the loader reach MLflow at every commit.
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    history = MlflowClient(saved["tracking_uri"]).get_metric_history(saved["run_id"], "data/skipped_cells")
    assert sorted(m.step for m in history) == [2, 4] and all(m.value == 0 for m in history)

    refused = _pretrain(run_dir, shards, vocab, "max_steps=6", "ema.base=0.9", resume=True)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "differs from the checkpoint's" in out and "ema.base: checkpoint 0.996, now 0.9" in out
    assert "max_steps: checkpoint 4, now 6" in out and "total_steps" in out and "--allow-config-change" in out
    assert json.loads((run_dir / "result.json").read_text())["final_step"] == 4  # nothing trained

    allowed = _pretrain(run_dir, shards, vocab, "max_steps=6", "ema.base=0.9", "checkpoint.allow_config_change=true",
                        resume=True)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resuming" in allowed.stdout and "changed config (allowed)" in allowed.stdout
    assert [json.loads(x)["step"] for x in (run_dir / "losses.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert list(run_dir.glob("config.before_step_00000004.yaml"))  # the old config kept beside the new
