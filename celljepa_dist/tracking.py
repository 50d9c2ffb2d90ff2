"""MLflow tracking on rank 0; other ranks get a no-op tracker.

Per-step metrics are buffered and flushed only when a checkpoint commits (and at the end). A run
killed between two checkpoints therefore has no metrics beyond its last committed step, and the
resumed run, which continues the same MLflow run (id kept in `run_dir/mlflow_run.json`), logs
each step exactly once.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.config import TrackingConfig

RUN_ID_FILE = "mlflow_run.json"


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """A local sqlite store beside the run dir, shared by sibling runs (MLflow's file store raises)."""
    db = (Path(run_dir).resolve().parent / "mlflow.db")
    return f"sqlite:///{db}"


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def last_logged_step(self) -> int: return -1
    def drop_pending(self) -> None: ...
    def log_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def log_artifact(self, path: str | os.PathLike) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, cfg: TrackingConfig, run_dir: str | os.PathLike, tags: dict[str, str], resume: bool):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.uri = cfg.uri or default_tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._pending: list = []
        self._metric_cls = mlflow.entities.Metric
        id_file = self.run_dir / RUN_ID_FILE
        if resume and id_file.exists():
            saved = json.loads(id_file.read_text())
            if saved["tracking_uri"] != self.uri:
                raise ValueError(f"{id_file}: run was tracked at {saved['tracking_uri']}, not {self.uri}")
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(cfg.experiment)
            # Artifacts beside the local store, not in MLflow's default ./mlruns of the cwd.
            artifacts = (self.run_dir.resolve().parent / "mlartifacts").as_uri()
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                cfg.experiment, artifact_location=artifacts)
            run = self.client.create_run(exp_id, run_name=cfg.run_name or self.run_dir.name, tags=tags)
            self.run_id = run.info.run_id
            atomic_write_text(id_file, json.dumps({"run_id": self.run_id, "tracking_uri": self.uri,
                                                   "experiment": cfg.experiment}))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def last_logged_step(self) -> int:
        """Highest step already in the run: a resume after a kill between a flush and its commit
        recomputes those steps and must not log them twice."""
        history = self.client.get_metric_history(self.run_id, "loss")
        return max((m.step for m in history), default=-1)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending += [self._metric_cls(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        for i in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[i:i + 1000])
        self._pending = []

    def drop_pending(self) -> None:
        self._pending = []

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(cfg: TrackingConfig, run_dir, rank: int, tags: dict[str, str], resume: bool):
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_dir, tags, resume)
