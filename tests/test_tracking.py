"""MLflow tracking against a real local sqlite store."""
from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from celljepa_dist.config import TrackingConfig
from celljepa_dist.tracking import NullTracker, default_tracking_uri, make_tracker


def _history(tracker, key):
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, key))


def test_metrics_are_buffered_until_flush_and_resume_continues_the_run(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    cfg = TrackingConfig(experiment="t")
    tr = make_tracker(cfg, run_dir, rank=0, tags={"objective": "celljepa", "world_size": "2"}, resume=False)
    assert tr.uri == default_tracking_uri(run_dir) and tr.uri.startswith("sqlite:///")
    tr.log_params({"optim.lr": 1e-4, "model.d_model": 64})
    tr.log_step(1, {"loss": 2.0, "lr": 1e-4})
    tr.log_step(2, {"loss": 1.5, "lr": 1e-4})
    assert _history(tr, "loss") == []  # nothing reaches MLflow before a checkpoint commits
    tr.flush()
    tr.log_step(3, {"loss": 1.0, "lr": 1e-4})  # computed after the commit, then the job dies
    run_id = tr.run_id
    del tr

    resumed = make_tracker(cfg, run_dir, rank=0, tags={}, resume=True)
    assert resumed.run_id == run_id
    assert resumed.last_logged_step() == 2
    resumed.log_params({"optim.lr": 1e-4, "model.d_model": 64})  # already there: not re-logged (no error)
    resumed.log_step(3, {"loss": 1.0, "lr": 1e-4})
    resumed.finish()
    assert _history(resumed, "loss") == [(1, 2.0), (2, 1.5), (3, 1.0)]
    run = MlflowClient(resumed.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0001" and run.data.tags["objective"] == "celljepa"
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    assert saved["run_id"] == run_id
    # Artifacts land beside the store, never in the cwd's ./mlruns.
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())


def test_only_rank_zero_tracks(tmp_path):
    cfg = TrackingConfig()
    assert isinstance(make_tracker(cfg, tmp_path, rank=1, tags={}, resume=False), NullTracker)
    assert isinstance(make_tracker(TrackingConfig(enabled=False), tmp_path, rank=0, tags={}, resume=False), NullTracker)
    assert not (tmp_path / "mlflow_run.json").exists()


def test_sibling_runs_share_one_store_as_separate_runs(tmp_path):
    a = make_tracker(TrackingConfig(experiment="pair"), tmp_path / "celljepa", 0, {"objective": "celljepa"}, False)
    b = make_tracker(TrackingConfig(experiment="pair"), tmp_path / "scgpt", 0, {"objective": "scgpt"}, False)
    assert a.uri == b.uri and a.run_id != b.run_id
    exp = a.client.get_experiment_by_name("pair")
    runs = a.client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["objective"] for r in runs) == ["celljepa", "scgpt"]
