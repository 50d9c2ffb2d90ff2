"""Data-parallel scaling of pre-training on this machine: cells/s of the tiny config with 1 rank
and with 2 ranks (each rank one thread), both measured in this run.

    python bench/scaling_bench.py [--steps 60] [--out bench_out/scaling]

Each configuration is a real `deepspeed` launch of launch/pretrain.py on simulated shards; the
rate is taken from the per-step `cells_per_s` metrics in MLflow after a warm-up, so process start,
imports and checkpoint saves are excluded. Last line:
    scaling_bench cells_per_s_1=<a> cells_per_s_2=<b> efficiency=<b/2a>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from celljepa_dist.atomic import save_png  # noqa: E402
from celljepa_dist.launching import deepspeed_launcher, free_port  # noqa: E402


def build_data(out: Path, cells: int) -> tuple[Path, Path]:
    """Simulated Census store -> vocab -> kidney shards (the data tools' real pipeline), cached."""
    from celljepa_dist.data.build import ShardBuildConfig, build_shards
    from celljepa_dist.data.census import CensusSource, CensusSourceConfig
    from celljepa_dist.data.shards import MANIFEST_NAME
    from celljepa_dist.data.simulate import SimulationConfig, write_store
    from celljepa_dist.data.vocab import GeneVocab

    vocab_path, shards = out / "vocab.json", out / "shards"
    if not (shards / MANIFEST_NAME).exists():
        store = write_store(out / "census", SimulationConfig(cells=cells, seed=1))
        with CensusSource(CensusSourceConfig(uri=str(store))) as src:
            vocab = GeneVocab.from_genes(src.feature_ids, src.feature_names)
            vocab.save(vocab_path)
            build_shards(src, vocab, ShardBuildConfig(out=str(shards), cells_per_shard=1000))
    return shards, vocab_path


def measure(ranks: int, shards: Path, vocab: Path, out: Path, steps: int, warmup: int, extra: list[str]) -> float:
    """Median per-step cells/s (global, all ranks) of a `ranks`-rank run after `warmup` steps."""
    from mlflow.tracking import MlflowClient

    run_dir = out / f"runs_{ranks}rank" / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir.parent)
    # Same per-rank micro-batch: the 2-rank run processes twice the cells per step (weak scaling,
    # as data parallelism is used in practice).
    sets = [f"run_dir={run_dir}", f"vocab={vocab}", f"data.shards_dir={shards}", f"max_steps={steps}",
            "epochs=1", "checkpoint.every_steps=0", "tracking.progress=false", "deepspeed.threads_per_rank=1",
            "objective=celljepa", "data.num_workers=0"] + extra
    cmd = deepspeed_launcher("--num_gpus", ranks, "--master_port", free_port(), REPO / "launch" / "pretrain.py",
                             "--config", REPO / "configs" / "tiny_cpu.yaml")
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{ranks}-rank run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    history = MlflowClient(saved["tracking_uri"]).get_metric_history(saved["run_id"], "cells_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > warmup]
    if not rates:
        raise SystemExit(f"{ranks}-rank run logged no steps after warm-up {warmup}")
    return statistics.median(rates)


def plot(a: float, b: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(["1 rank", "2 ranks", "2 ranks ideal"], [a, b, 2 * a], color=["C0", "C1", "0.7"])
    ax.set_ylabel("cells/s")
    ax.set_title(f"data-parallel efficiency {b / (2 * a):.2f}")
    fig.tight_layout()
    save_png(fig, png, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench_out" / "scaling"))
    p.add_argument("--cells", type=int, default=6000, help="simulated cells (about 40%% are kidney)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs (e.g. deepspeed.zero_stage=0)")
    args = p.parse_args(argv)
    out = Path(args.out)
    shards, vocab = build_data(out, args.cells)
    a = measure(1, shards, vocab, out, args.steps, args.warmup, args.overrides)
    print(f"1 rank : {a:.1f} cells/s", flush=True)
    b = measure(2, shards, vocab, out, args.steps, args.warmup, args.overrides)
    print(f"2 ranks: {b:.1f} cells/s", flush=True)
    plot(a, b, out / "scaling.png")
    print(f"plot: {out / 'scaling.png'}")
    print(f"scaling_bench cells_per_s_1={a:.1f} cells_per_s_2={b:.1f} efficiency={b / (2 * a):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
