"""Two finished tiny pre-training runs (celljepa and scgpt) sharing one MLflow store, trained once per
test session through the real CLI (launch/pretrain.py, 1 rank, 6 steps) and shared by the test
modules that import `trained_tiny_runs`.

The end of pre-training logs `final/<loss>` metrics and a loss-curve PNG artefact to each run
(docs/tracking.md); the tests rely on that, nothing is added here.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch_helpers import cpu_env, pretrain_argv

from celljepa_dist.tracking import RUN_ID_FILE, default_run_name

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "celljepa-demo"  # configs/tiny_cpu.yaml
D_MODEL, N_LAYERS = 64, 2  # configs/tiny_cpu.yaml
OBJECTIVES = ("celljepa", "scgpt")


@dataclass(frozen=True)
class TinyRun:
    objective: str
    run_dir: Path
    run_id: str
    run_name: str
    losses: list[dict]  # losses.jsonl records, in step order

    @property
    def last_losses(self) -> dict[str, float]:
        return {k: v for k, v in self.losses[-1].items() if k.startswith("loss")}


@dataclass(frozen=True)
class TinyRuns:
    tracking_uri: str
    experiment: str
    runs: dict[str, TinyRun]  # by objective

    @property
    def store(self) -> Path:
        return Path(self.tracking_uri[len("sqlite:///"):])


_CACHE: dict[Path, TinyRuns] = {}


def _train(run_dir: Path, objective: str, run_name: str, shards_dir: Path, vocab_path: Path) -> None:
    argv = pretrain_argv(REPO_ROOT / "configs" / "tiny_cpu.yaml",
                         [f"run_dir={run_dir}", f"vocab={vocab_path}", f"data.shards_dir={shards_dir}", "max_steps=6",
                          "checkpoint.every_steps=3", "tracking.progress=false",
                          f"objective={objective}"])  # the run name is pre-training's own default
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=cpu_env())
    if done.returncode != 0:
        raise RuntimeError(f"tiny {objective} run failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


def trained_tiny_runs(tiny_shards: tuple[Path, Path], tmp_path_factory) -> TinyRuns:
    key = tmp_path_factory.getbasetemp()
    if key not in _CACHE:
        shards_dir, vocab_path = tiny_shards
        root = tmp_path_factory.mktemp("tiny_runs")
        runs = {}
        for objective in OBJECTIVES:
            run_dir = root / f"tiny_{objective}"
            name = default_run_name(objective, D_MODEL, N_LAYERS, run_dir.name)
            _train(run_dir, objective, name, shards_dir, vocab_path)
            losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines() if line]
            run_id = json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"]
            run = TinyRun(objective, run_dir, run_id, name, losses)
            runs[objective] = run
        _CACHE[key] = TinyRuns(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment=EXPERIMENT, runs=runs)
    return _CACHE[key]
