"""`launch/pretrain.py` with its per-step metrics in a file instead of MLflow.

The GPU machine has no MLflow (and carrying its ~20 packages there would test MLflow, not the
GPU), so the GPU check launches pre-training through this wrapper: the same argv, the same
`launch/pretrain.py` main, the same DeepSpeed engine, loader and loop; only rank 0's tracker is a
`JsonlTracker`, which keeps MlflowTracker's contract (metrics buffered until a checkpoint commits,
a resume logs no step twice) and writes `run_dir/step_metrics.jsonl`:

    python -m deepspeed.launcher.runner --num_gpus 1 bench/gpu_pretrain.py --config C --set ...
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from celljepa_dist.atomic import atomic_write_text  # noqa: E402
from celljepa_dist.tracking import NullTracker  # noqa: E402

METRICS_FILE = "step_metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The committed per-step metrics of a run, in step order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class JsonlTracker(NullTracker):
    """Rank 0's tracker: `log_step` buffers, `flush` (at each commit) appends to the file."""

    def __init__(self, run_dir: str | Path, resume: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self.run_id = f"jsonl:{self.path}"
        self._pending: list[dict] = []
        if not resume and self.path.exists():
            self.path.unlink()

    def last_logged_step(self) -> int:
        return max((r["step"] for r in read_metrics(self.path.parent) if "loss" in r), default=-1)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._pending.append({"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}})

    def flush(self) -> None:
        if self._pending:
            old = self.path.read_text() if self.path.exists() else ""
            atomic_write_text(self.path, old + "".join(json.dumps(r) + "\n" for r in self._pending))
            self._pending = []

    def drop_pending(self) -> None:
        self._pending = []

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()


def jsonl_make_tracker(cfg, run_dir, rank: int, tags: dict, resume: bool, run_name=None):
    """`tracking.make_tracker`'s signature and rank rule, with the file in place of MLflow."""
    return JsonlTracker(run_dir, resume) if rank == 0 and cfg.enabled else NullTracker()


def main() -> int:
    import launch.pretrain as pretrain
    from celljepa_dist.train import loop

    loop.make_tracker = jsonl_make_tracker  # the loop's one tracker factory (imported by name)
    return pretrain.main()


if __name__ == "__main__":
    sys.exit(main())
