"""`make demo`: the main job on the embedded default, step by step, idempotent.

    python launch/demo.py --out demo_out [--cells 20000]
Steps (each skipped when its output is already there and verified):
  1. simulate a local store shaped like the CELLxGENE Census   -> OUT/census
  2. build the gene vocabulary from it                          -> OUT/vocab.json
  3. stream the kidney cells into shards                        -> OUT/shards
  4. validate the shards against the manifest, plot a summary   -> OUT/shards_summary.png
Later steps (pre-training, evaluation) append to STEPS.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import CensusSource, CensusSourceConfig
from celljepa_dist.data.shards import MANIFEST_NAME, validate_shards
from celljepa_dist.data.simulate import SimulationConfig, write_store
from celljepa_dist.data.summary import plot_shard_summary, summarize_shards
from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.launching import deepspeed_launcher, free_port


@dataclass
class Demo:
    out: Path
    cells: int = 20_000
    seed: int = 0
    cells_per_shard: int = 2_000

    @property
    def census(self) -> Path:
        return self.out / "census"

    @property
    def vocab(self) -> Path:
        return self.out / "vocab.json"

    @property
    def shards(self) -> Path:
        return self.out / "shards"


def step_simulate(d: Demo) -> str:
    write_store(d.census, SimulationConfig(cells=d.cells, seed=d.seed))  # returns at once if already there
    return f"Census-shaped store ({d.cells} cells): {d.census}"


def step_vocab(d: Demo) -> str:
    if not d.vocab.exists():
        with CensusSource(CensusSourceConfig(uri=str(d.census))) as src:
            GeneVocab.from_genes(src.feature_ids, src.feature_names).save(d.vocab)
    v = GeneVocab.load(d.vocab)
    return f"vocab ({len(v)} tokens, sha256 {v.sha256[:12]}): {d.vocab}"


def step_shards(d: Demo) -> str:
    if not (d.shards / MANIFEST_NAME).exists():  # a partial run resumes: verified shards are skipped
        with CensusSource(CensusSourceConfig(uri=str(d.census))) as src:
            build_shards(src, GeneVocab.load(d.vocab), ShardBuildConfig(out=str(d.shards), cells_per_shard=d.cells_per_shard))
    return f"shards (kidney, primary cells): {d.shards}"


def step_validate(d: Demo) -> str:
    vocab = GeneVocab.load(d.vocab)
    faults = validate_shards(d.shards, vocab.sha256, len(vocab))
    if faults:
        raise SystemExit("shard validation failed:\n  " + "\n  ".join(faults))
    s = summarize_shards(d.shards)
    png = plot_shard_summary(s, d.out / "shards_summary.png")
    return (f"validated {s['total_cells']} cells in {s['shards']} shards, median {s['genes_per_cell_median']:.0f} "
            f"genes/cell, {s['bytes_per_expressed_gene']:.1f} B/gene; plot: {png}")


STEPS = [("simulate", step_simulate), ("vocab", step_vocab), ("shards", step_shards), ("validate", step_validate)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cells", type=int, default=Demo.cells)
    p.add_argument("--seed", type=int, default=Demo.seed)
    p.add_argument("--cells-per-shard", type=int, default=Demo.cells_per_shard)
    args = p.parse_args(argv)
    d = Demo(Path(args.out), args.cells, args.seed, args.cells_per_shard)
    d.out.mkdir(parents=True, exist_ok=True)
    for i, (name, step) in enumerate(STEPS, 1):
        t = time.time()
        print(f"[{i}/{len(STEPS)}] {name} ...", flush=True)
        print(f"[{i}/{len(STEPS)}] {name}: {step(d)} ({time.time() - t:.1f}s)", flush=True)
    return 0


# --- pre-training (owned by the training engineer) ---------------------------------------------
REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def pretrain_one(d: Demo, objective: str, ranks: int = 2) -> dict:
    """2-rank CPU pre-training of one objective through the deepspeed launcher; resumes if cut."""
    import json
    import os
    import subprocess

    run_dir = d.out / "runs" / f"tiny_{objective}"
    result = run_dir / "result.json"
    if not result.exists():
        cmd = deepspeed_launcher("--num_gpus", ranks, "--master_port", free_port(), REPO / "launch" / "pretrain.py",
                                 "--config", PRETRAIN_CONFIG, "--set", f"objective={objective}",
                                 "--set", f"run_dir={run_dir}", "--set", f"vocab={d.vocab}",
                                 "--set", f"data.shards_dir={d.shards}")
        if list(run_dir.glob("checkpoints/*/COMMITTED")):
            cmd += ["--resume", "auto"]  # an interrupted demo continues where it stopped
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True)
    return json.loads(result.read_text())


def step_pretrain(d: Demo) -> str:
    from celljepa_dist.train.report import plot_loss_curves

    results = {obj: pretrain_one(d, obj) for obj in ("celljepa", "scgpt")}
    png = plot_loss_curves({obj: d.out / "runs" / f"tiny_{obj}" for obj in results}, d.out / "pretrain_losses.png")
    lines = [f"{obj}: {r['final_step']} steps, checkpoint {r['checkpoint']}, MLflow run {r['mlflow_run_id']}"
             for obj, r in results.items()]
    store = (d.out / "runs" / "mlflow.db").resolve()
    return "\n    " + "\n    ".join(lines) + f"\n    MLflow store: sqlite:///{store}; loss curves: {png}"


STEPS.append(("pretrain", step_pretrain))


if __name__ == "__main__":
    sys.exit(main())
