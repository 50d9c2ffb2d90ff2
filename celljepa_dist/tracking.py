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
import sys
import time
from pathlib import Path
from typing import Any

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.config import TrackingConfig

RUN_ID_FILE = "mlflow_run.json"
# Where `make demo` tracks its runs; the store tools fall back to when given none.
DEMO_STORE = Path("demo_out/runs/mlflow.db")
# Prefix of the metrics that summarise a finished run (no step), so the runs table has stable columns.
FINAL_PREFIX = "final/"


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """A local sqlite store beside the run dir, shared by sibling runs (MLflow's file store raises)."""
    db = (Path(run_dir).resolve().parent / "mlflow.db")
    return f"sqlite:///{db}"


def sqlite_store_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI, None for any other kind of store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):])


def store_artifact_root(tracking_uri: str) -> str | None:
    """`<store dir>/mlartifacts` as a file URI: where MlflowTracker puts the runs' artifacts of a
    local sqlite store (None for other stores, whose artifact location the server already knows)."""
    db = sqlite_store_path(tracking_uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_uri()


def resolve_store_uri(tracking_uri: str | None = None) -> str:
    """The store to read: the URI given, else $MLFLOW_TRACKING_URI, else the demo store if `make demo`
    made one. A sqlite store must already exist: MLflow would silently create an empty one."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if not DEMO_STORE.exists():
            raise FileNotFoundError(f"no tracking store given and no demo store at {DEMO_STORE}: pass "
                                    "--tracking-uri sqlite:///<runs dir>/mlflow.db (or set MLFLOW_TRACKING_URI), "
                                    "or run `make demo` first")
        uri = f"sqlite:///{DEMO_STORE.resolve()}"
    db = sqlite_store_path(uri)
    if db is not None:
        if not db.is_file():
            raise FileNotFoundError(f"MLflow store not found: {db} (from tracking URI {uri}); nothing has "
                                    "been tracked there yet: run `make demo` or launch/pretrain.py first")
        uri = f"sqlite:///{db.resolve()}"  # absolute: a server or a child process may run elsewhere
    return uri


def default_run_name(objective: str, d_model: int, n_layers: int, run_dir_name: str) -> str:
    """What the runs table shows: which run, which objective, what size, e.g. `kidney (scgpt d512 L12)`,
    or `tiny_celljepa (d64 L2)` where the run dir already names the objective (the table truncates)."""
    size = f"d{d_model} L{n_layers}"
    return f"{run_dir_name} ({size})" if objective in run_dir_name else f"{run_dir_name} ({objective} {size})"


def log_run_artifacts(tracking_uri: str, run_id: str, paths, artifact_path: str | None = None) -> None:
    """Attach files (PNGs, metrics.md, ...) to a run, e.g. after it finished."""
    from mlflow.tracking import MlflowClient

    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot log artifacts to run {run_id}: no such file(s): {', '.join(missing)}")
    client = MlflowClient(tracking_uri=tracking_uri)
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path)


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
    def log_final(self, metrics: dict[str, float]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, cfg: TrackingConfig, run_dir: str | os.PathLike, tags: dict[str, str], resume: bool,
                 run_name: str | None = None):
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
            run = self.client.create_run(exp_id, run_name=cfg.run_name or run_name or self.run_dir.name,
                                          tags=tags)
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

    def log_final(self, metrics: dict[str, float]) -> None:
        """`final/<name>` for each metric (e.g. the last step's losses), at step 0: one value per run
        under a name that does not depend on how long the run was. Values the run already holds are
        not logged again: a finished run resumed once more adds no point."""
        now = int(time.time() * 1000)
        held = self.client.get_run(self.run_id).data.metrics
        fresh = {f"{FINAL_PREFIX}{k}": float(v) for k, v in metrics.items()}
        self.client.log_batch(self.run_id, metrics=[self._metric_cls(k, v, now, 0) for k, v in fresh.items()
                                                    if held.get(k) != v])

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def finish_failed(tracker, status: str = "FAILED") -> None:
    """Mark the run `status` (FAILED, or KILLED for an interrupt) after the error that stopped it.
    Metrics past the last commit are dropped
    (a resume recomputes them). A failure of MLflow itself here (often the same full disk, as
    "database or disk is full") is a warning: it must never replace the error that stopped the run."""
    stopped_by = sys.exc_info()[1]  # called from an except block: the error that stopped the run
    tracker.drop_pending()
    try:
        tracker.finish(status)
    except Exception as err:
        cause = f"{type(stopped_by).__name__}: {stopped_by}" if stopped_by is not None else "an error"
        print(f"WARNING: the run stopped on {cause}. Marking its MLflow run {status} then failed too "
              f"({type(err).__name__}: {err}); the traceback of the first error follows", file=sys.stderr, flush=True)


def make_tracker(cfg: TrackingConfig, run_dir, rank: int, tags: dict[str, str], resume: bool,
                 run_name: str | None = None):
    """`run_name`: the name when the config sets none (e.g. `default_run_name(...)`)."""
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_dir, tags, resume, run_name)
