"""Shards of simulated cells built without TileDB, for machines that lack it (the GPU check).

The cells are the Census simulation's (`data/simulate.py`: `CensusWorld`, `simulate_block`, pure
numpy), held in memory and handed to the real shard builder (`data/build.py`) as a cell source, so
the shards, the vocab and the manifest are exactly what `data_tools/` writes, only the TileDB store
is skipped. Kidney-like cells: thousands of expressed genes each, so `max_genes: 600` fills L=601.

    python bench/gpu_shards.py --out DIR [--cells 2048] [--genes 10000] [--seed 0]
    -> DIR/vocab.json, DIR/shards/{shard-*.tar, manifest.json}
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class SimulatedSource:
    """A cell source (what `build_shards` reads) over `n_cells` simulated cells held in memory."""

    def __init__(self, n_cells: int, genes: int = 10_000, seed: int = 0):
        import pandas as pd

        from celljepa_dist.data.census import META_COLUMNS
        from celljepa_dist.data.simulate import BLOCK_CELLS, CensusWorld, SimulationConfig, simulate_block

        if n_cells < 1:
            raise ValueError(f"n_cells must be >= 1, got {n_cells}")
        self.cfg = SimulationConfig(cells=n_cells, genes=genes, seed=seed)
        self.cfg.validate()
        world = CensusWorld(self.cfg)
        self.feature_ids, self.feature_names = world.feature_ids, world.feature_names
        self.where = f"simulated cells (n={n_cells}, genes={genes}, seed={seed})"
        self.layer_is_raw = True
        obs, row_ends, cols, counts, nnz = [], [np.zeros(1, np.int64)], [], [], 0
        for block in range(-(-n_cells // BLOCK_CELLS)):  # the store's blocks: the same cells as write_store
            o, ip, c, v = simulate_block(world, block, min(BLOCK_CELLS, n_cells - block * BLOCK_CELLS))
            obs.append(pd.DataFrame({k: o[k] for k in META_COLUMNS}))
            row_ends.append(ip[1:].astype(np.int64) + nnz)
            nnz += int(ip[-1])
            cols.append(c)
            counts.append(v)
        self.indptr = np.concatenate(row_ends)
        self.cols = np.concatenate(cols).astype(np.int64)
        self.counts = np.concatenate(counts).astype(np.float32)
        self.obs = pd.concat(obs, ignore_index=True)
        self.obs.insert(0, "soma_joinid", np.arange(n_cells, dtype=np.int64))

    def describe(self) -> dict:
        return {"kind": "simulated-in-memory", "cells": self.cfg.cells, "genes": self.cfg.genes, "seed": self.cfg.seed}

    def cells(self):
        return self.obs

    def read_rows(self, joinids: np.ndarray):
        """CSR (indptr, gene index, float32 counts) of the given joinids, in that order."""
        starts, ends = self.indptr[joinids], self.indptr[joinids + 1]
        lengths = ends - starts
        take = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(joinids) else np.zeros(0, int)
        return (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), self.cols[take], self.counts[take])


def build(out: Path, cells: int, genes: int = 10_000, seed: int = 0, cells_per_shard: int = 512) -> tuple[Path, Path]:
    """Simulated cells -> vocab.json + shards under `out`; returns (shards dir, vocab path)."""
    from celljepa_dist.data.build import ShardBuildConfig, build_shards
    from celljepa_dist.data.vocab import GeneVocab

    source = SimulatedSource(cells, genes, seed)
    vocab = GeneVocab.from_genes(source.feature_ids, source.feature_names)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, shards = out / "vocab.json", out / "shards"
    vocab.save(vocab_path)
    manifest = build_shards(source, vocab, ShardBuildConfig(out=str(shards), cells_per_shard=cells_per_shard,
                                                            block_size=256), progress=False)
    if manifest is None:
        raise RuntimeError(f"{shards}: the shard build did not finish")
    return shards, vocab_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cells", type=int, default=2048)
    p.add_argument("--genes", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cells-per-shard", type=int, default=512)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    shards, vocab = build(Path(args.out), args.cells, args.genes, args.seed, args.cells_per_shard)
    print(f"gpu_shards shards={shards} vocab={vocab} cells={args.cells} seconds={time.perf_counter() - t0:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
