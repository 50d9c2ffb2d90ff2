"""launch/perturb.py end to end on the simulated screen: real DeepSpeed (CPU), real MLflow store.

Acceptance: the trained model beats the control-mean baseline on pearson_delta for unseen
singles, and the run writes perturb_metrics.json {method: {subgroup: {metric}}}, the markdown
table with every baseline, the PNG and the split. A run killed in a checkpoint save and resumed
gives bit-identical losses and test metrics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch_helpers import cpu_env
from perturb_fixtures import write_sim, write_tiny_init

from celljepa_dist.launching import deepspeed_launcher, free_port
from celljepa_dist.perturb.baselines import BASELINES
from celljepa_dist.perturb.metrics import METRICS
from celljepa_dist.train.checkpoint import KILL_BEFORE_COMMIT_ENV, committed_checkpoints

REPO = Path(__file__).resolve().parents[1]
PERTURB = REPO / "launch" / "perturb.py"
CONFIG = REPO / "configs" / "perturb_tiny.yaml"
pytestmark = [pytest.mark.multiproc]  # and each test slow: minutes on 2 shared CPU cores


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("perturb_launch")
    return write_sim(root), write_tiny_init(root)


def launch(inputs, run_dir: Path, *sets: str, variants: str = "celljepa", env: dict | None = None,
           extra: tuple[str, ...] = (), ranks: int = 1) -> subprocess.CompletedProcess:
    gears_dir, init = inputs
    head = [*map(str, deepspeed_launcher("--num_gpus", ranks, "--master_port", free_port(), PERTURB))] \
        if ranks > 1 else [sys.executable, str(PERTURB)]
    argv = [*head, "--config", str(CONFIG), "--run-dir", str(run_dir), "--variants", variants,
            "--set", f"init={init}", "--set", f"data.gears_dir={gears_dir}", *extra]
    for s in sets:
        argv += ["--set", s]
    return subprocess.run(argv, env=cpu_env(env), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_rank_run_of_both_variants_writes_one_table(inputs, tmp_path):
    """The smallest whole run (~2.5 min here): 2 CPU ranks (interleaved batches, validation split over ranks and
    all-reduced), both variants, one epoch; the combined report holds every method."""
    run_dir = tmp_path / "run"
    done = launch(inputs, run_dir, "epochs=1", "data.batch_size=16", "data.eval_cells_per_perturbation=3",
                  variants="celljepa,scgpt", ranks=2)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((run_dir / "perturb_metrics.json").read_text())
    assert set(results) == {"celljepa", "scgpt", *BASELINES}
    assert all(r["unseen_single"]["n_perturbations"] == results["control_mean"]["unseen_single"]["n_perturbations"]
               for r in results.values())
    for v in ("celljepa", "scgpt"):
        assert (run_dir / v / "best_model" / "best.json").exists()
        assert json.loads((run_dir / v / "perturb_metrics.json").read_text())[v] == results[v]
    assert yaml.safe_load((run_dir / "scgpt" / "config.yaml").read_text())["objective"] == "scgpt"
    assert "| celljepa |" in (run_dir / "perturb_metrics.md").read_text()


@pytest.mark.slow
def test_perturbation_run_beats_control_mean_and_reports_every_baseline(inputs, tmp_path):
    run_dir = tmp_path / "run"
    done = launch(inputs, run_dir, "epochs=3", "optim.lr=3e-3")
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((run_dir / "perturb_metrics.json").read_text())
    assert set(results) == {"celljepa", *BASELINES}
    for method, groups in results.items():
        assert set(groups) == {"unseen_single", "combo_seen0", "combo_seen1", "combo_seen2"}, method
        assert all(set(METRICS) <= set(m) for m in groups.values())
    unseen = {m: results[m]["unseen_single"]["pearson_delta"] for m in results}
    assert unseen["control_mean"] == 0.0
    assert unseen["celljepa"] > 0.2, unseen  # the acceptance bar: beats "no change" clearly
    table = (run_dir / "perturb_metrics.md").read_text()
    assert all(f"| {m} |" in table for m in results) and "## pearson_delta" in table
    assert (run_dir / "perturb_deltas.png").stat().st_size > 10_000
    sub = run_dir / "celljepa"
    best = json.loads((sub / "best_model" / "best.json").read_text())
    state = json.loads((committed_checkpoints(sub / "checkpoints")[-1] / "train_state.json").read_text())
    assert state["task"]["best_epoch"] == best["epoch"] and len(state["task"]["history"]) == 3
    assert best["value"] == max(h["pearson"] for h in state["task"]["history"])
    split = json.loads((sub / "perturb_split.json").read_text())
    assert split["seed"] == 1 and "ctrl" in split["train"]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((sub / "mlflow_run.json").read_text())["run_id"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test/celljepa/unseen_single/pearson_delta"] == pytest.approx(unseen["celljepa"])
    assert "val/pearson" in metrics and "test/additive/combo_seen2/pearson_delta" in metrics


@pytest.mark.slow
def test_killed_perturbation_run_resumes_bit_identically(inputs, tmp_path):
    sets = ("epochs=2", "deterministic=true", "checkpoint.every_steps=5", "checkpoint.keep_last=5")
    whole = tmp_path / "whole"
    done = launch(inputs, whole, *sets, variants="scgpt")
    assert done.returncode == 0, done.stderr[-4000:]
    killed = tmp_path / "killed"
    first = launch(inputs, killed, *sets, variants="scgpt", env={KILL_BEFORE_COMMIT_ENV: "20"})
    assert first.returncode != 0
    assert committed_checkpoints(killed / "scgpt" / "checkpoints")[-1].name == "step_00000015"
    second = launch(inputs, killed, *sets, variants="scgpt", extra=("--resume", "auto"))
    assert second.returncode == 0, second.stderr[-4000:]
    for name in ("losses.jsonl", "perturb_metrics.json", "best_model/best.json"):
        assert (killed / "scgpt" / name).read_text() == (whole / "scgpt" / name).read_text(), name
