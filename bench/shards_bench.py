"""Shard building throughput from a local Census-shaped store, against a naive per-cell baseline.

    python bench/shards_bench.py [--cells 200000] [--out bench_out/shards]
Simulates the store once (cached under --out), then times census_to_shards end to end (one process,
as the CLI runs it: TileDB read, validation, gene mapping, binning, tar writing, sha256, with read,
process and write overlapping in threads) on the default kidney filter. It prints cells/s (wall) and
cells per CPU-second (all threads' CPU time: the "per core" rate). In the same run it bins the same
cells with the naive per-cell reference (np.quantile + np.digitize per cell, bin_cell_reference) and
with the compiled bin_csr; ratio_vs_naive = their speed ratio.
Last line: shards_bench cells_per_s=<x> ratio_vs_naive=<y>
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from celljepa_dist.data.allocator import tune_malloc_for_reading
from celljepa_dist.data.binning import bin_csr, bin_csr_reference
from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import CensusSource, CensusSourceConfig
from celljepa_dist.data.shards import read_shard
from celljepa_dist.data.simulate import SimulationConfig, write_store
from celljepa_dist.data.vocab import GeneVocab


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--out", default="bench_out/shards")
    p.add_argument("--cells-per-shard", type=int, default=20_000)
    p.add_argument("--naive-cells", type=int, default=5_000, help="cells binned by the naive loop")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats of the binning comparison")
    args = p.parse_args(argv)
    tune_malloc_for_reading()  # as census_to_shards does
    out = Path(args.out)
    store, t_sim, _ = timed(lambda: write_store(out / f"census_{args.cells}", SimulationConfig(cells=args.cells)))
    print(f"store: {store} ({args.cells} cells; {t_sim:.1f}s, cached after the first run)")
    with CensusSource(CensusSourceConfig(uri=str(store))) as src:
        vocab = GeneVocab.from_genes(src.feature_ids, src.feature_names)
        shards = out / "shards"
        shutil.rmtree(shards, ignore_errors=True)
        cfg = ShardBuildConfig(out=str(shards), cells_per_shard=args.cells_per_shard)
        stages = {}
        m, wall, cpu = timed(lambda: build_shards(src, vocab, cfg, progress=False, timings=stages))
    n = m["total_cells"]
    print("stages (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    first = read_shard(shards / m["shards"][0]["name"])
    first_bytes = (shards / m["shards"][0]["name"]).stat().st_size  # format cost, measured on shard 0
    print(f"end to end: {n} cells in {wall:.2f}s wall / {cpu:.2f}s CPU -> {n / wall:,.0f} cells/s "
          f"({n / cpu:,.0f} cells per CPU-second), {first_bytes / first.offsets[-1]:.2f} bytes per expressed gene "
          f"({first.offsets[-1] / len(first):.0f} expressed genes per cell)")

    k = min(args.naive_cells, len(first))
    offsets, counts = first.offsets[: k + 1], first.counts[: first.offsets[k]]
    # Interleaved repeats, best of each: the two sides see the same machine load.
    t_naive = t_fast = float("inf")
    for _ in range(args.repeats):
        ref, t, _ = timed(lambda: bin_csr_reference(offsets, counts, 51))
        t_naive = min(t_naive, t)
        fast, t, _ = timed(lambda: bin_csr(offsets, counts, 51))
        t_fast = min(t_fast, t)
    assert np.array_equal(ref, fast), "compiled binning differs from the per-cell reference"
    print(f"binning {k} cells: naive per-cell {k / t_naive:,.0f} cells/s, compiled {k / t_fast:,.0f} cells/s "
          f"(end to end is {n / wall / (k / t_naive):.1f}x the naive binning alone)")
    print(f"shards_bench cells_per_s={n / wall:.0f} ratio_vs_naive={t_naive / t_fast:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
