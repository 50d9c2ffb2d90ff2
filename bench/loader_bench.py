"""Loader benchmark: cells/s of the shard loader vs a loader reading the SOMA store directly.

Both build the same batch tensors (same cells' genes mapped to the vocab, the same deterministic
bins, subsampling to 600 genes, 15% masking, padding) from the same simulated Census-shaped store:

- ours: `build_loader` over webdataset shards built from the store (1 process, `--workers` workers);
- baseline: tiledbsoma-ml's `ExperimentDataset` (shuffled, sparse X) over the store, each batch
  mapped to vocab tokens and binned with the shard builder's own functions, then `collate_cells`,
  in the same number of DataLoader workers.

The run checks that both produce identical tensors for the cells they share, then prints cells/s
and writes `bench_out/loader_bench/loader_bench.{json,png}`. Last line:
`loader_bench cells_per_s=<x> ratio_vs_soma=<y>`. Targets: x >= 25,000 (one H100 consumes
~2,700 cells/s), y >= 5. The 200k-cell store and its shards are cached under bench_out/.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from celljepa_dist.atomic import save_png
from celljepa_dist.data.collate import collate_cells, to_tensors
from celljepa_dist.data.stream import LoaderConfig, build_loader

OUT = Path(__file__).resolve().parents[1] / "bench_out" / "loader_bench"
N_BINS = 51  # the shard builder's default: bins 1..50 (paper B = 50)


def ensure_data(cells: int, obs_filter: str, cells_per_shard: int) -> tuple[Path, Path, Path]:
    from celljepa_dist.data.build import ShardBuildConfig, build_shards
    from celljepa_dist.data.census import CensusSource, CensusSourceConfig
    from celljepa_dist.data.simulate import SimulationConfig, write_store
    from celljepa_dist.data.vocab import GeneVocab

    store, vocab_path, shards = OUT / f"store_{cells}", OUT / f"vocab_{cells}.json", OUT / f"shards_{cells}"
    write_store(store, SimulationConfig(cells=cells, seed=0))  # idempotent: skips a finished store
    source_cfg = CensusSourceConfig(uri=str(store), obs_filter=obs_filter)
    if not vocab_path.exists():
        with CensusSource(source_cfg) as source:
            GeneVocab.from_genes(source.feature_ids, source.feature_names).save(vocab_path)
    if not (shards / "manifest.json").exists():
        with CensusSource(source_cfg) as source:
            build_shards(source, GeneVocab.load(vocab_path),
                         ShardBuildConfig(out=str(shards), cells_per_shard=cells_per_shard, n_bins=N_BINS))
    return store, vocab_path, shards


def keep_rows(batch: dict, sample: dict, every: int) -> None:
    """Remember the token rows of cells whose joinid % every == 0 (for the equality check)."""
    for i in np.flatnonzero(batch["cell_ids"].numpy() % every == 0):
        n = int(batch["lengths"][i])
        sample[int(batch["cell_ids"][i])] = tuple(batch[k][i, :n].numpy().tobytes()
                                                  for k in ("gene_ids", "values", "target_values", "value_mask"))


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader workers, once shut down)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_timed(make_batches, max_cells: int, sample: dict, every: int) -> tuple[float, int, float]:
    """(wall cells/s, cells, cells per CPU-second) -- the last is what one free core would give;
    on a shared machine the wall rate depends on the other jobs."""
    cpu0, start, cells = cpu_seconds(), time.perf_counter(), 0
    batches = iter(make_batches())
    for batch in batches:
        cells += len(batch["cell_ids"])
        keep_rows(batch, sample, every)
        if cells >= max_cells:
            break
    wall = time.perf_counter() - start
    del batches, batch  # shuts the workers down, so their CPU time is counted
    return cells / wall, cells, cells / (cpu_seconds() - cpu0)


def ours(shards: Path, workers: int, batch_size: int, max_cells: int, sample: dict, every: int):
    cfg = LoaderConfig(shards_dir=str(shards), batch_size=batch_size, num_workers=workers, seed=0)
    loader, _ = build_loader(cfg, rank=0, world_size=1, epoch=0)
    return run_timed(lambda: loader, max_cells, sample, every)


class SomaBatches(IterableDataset):
    """tiledbsoma-ml mini-batches -> vocab tokens -> bins -> the same collate as the loader."""

    def __init__(self, ds, tokens: np.ndarray, feature_ids: list[str], batch_size: int):
        self.ds, self.tokens, self.feature_ids, self.batch_size = ds, tokens, feature_ids, batch_size

    def __iter__(self):
        import scipy.sparse as sp

        from celljepa_dist.data.build import cells_to_block

        for X, obs in self.ds:  # dense rows: tiledbsoma-ml refuses sparse X with DataLoader workers
            X = sp.csr_matrix(X)
            joinids = obs["soma_joinid"].to_numpy(np.int64)
            block, _ = cells_to_block(joinids, X.indptr, X.indices, X.data, self.tokens, {}, N_BINS, False,
                                      self.feature_ids, "soma")
            yield to_tensors(collate_cells(block.offsets, block.genes, block.bins, block.joinids,
                                           seed=0, epoch=0, max_genes=600, mask_ratio=0.15))


def soma(store: Path, vocab_path: Path, obs_filter: str, workers: int, batch_size: int, max_cells: int,
         sample: dict, every: int):
    import tiledbsoma
    import tiledbsoma_ml

    from celljepa_dist.data.census import CensusSource, CensusSourceConfig
    from celljepa_dist.data.vocab import GeneVocab

    with CensusSource(CensusSourceConfig(uri=str(store), obs_filter=obs_filter)) as source:
        feature_ids = source.feature_ids
        tokens, _ = GeneVocab.load(vocab_path).map_genes(source.feature_ids, source.feature_names)
    exp = tiledbsoma.Experiment.open(str(store / "census_data" / "homo_sapiens"))
    start = time.perf_counter()
    with exp.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(value_filter=obs_filter)) as query:
        ds = tiledbsoma_ml.ExperimentDataset(query, layer_name="raw", batch_size=batch_size, shuffle=True, seed=0,
                                             return_sparse_X=False, obs_column_names=["soma_joinid"])
        # columns of X follow the query's var joinids, which are 0..n_var-1 in this store
        loader = DataLoader(SomaBatches(ds, tokens, feature_ids, batch_size), batch_size=None, num_workers=workers)
        rate, cells, per_cpu = run_timed(lambda: loader, max_cells, sample, every)
    setup = time.perf_counter() - start - cells / rate
    exp.close()
    return rate, cells, per_cpu, setup


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh(names, [results[n] for n in names], color=["tab:blue", "tab:cyan", "tab:gray"][: len(names)])
    ax.axvline(25_000, color="tab:red", ls="--", lw=1, label="target 25k cells/s")
    ax.axvline(2_700, color="tab:green", ls=":", lw=1, label="one H100 (~2.7k cells/s)")
    ax.set_xlabel("cells / s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000, help="cells in the simulated store")
    p.add_argument("--obs-filter", default="is_primary_data == True")
    p.add_argument("--cells-per-shard", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-cells", type=int, default=10**9, help="cells timed for our loader (default: an epoch)")
    p.add_argument("--soma-cells", type=int, default=30_000, help="cells timed for the SOMA baseline")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    store, vocab_path, shards = ensure_data(args.cells, args.obs_filter, args.cells_per_shard)

    every = 7  # compare the tensors of ~1/7 of the cells
    ours_rows, soma_rows, single_rows = {}, {}, {}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before the run")
    rate, cells, cpu = ours(shards, args.workers, args.batch_size, args.max_cells, ours_rows, every)
    print(f"ours ({args.workers} workers): {rate:,.0f} cells/s over {cells:,} cells; {cpu:,.0f} cells per CPU-second")
    rate0, cells0, cpu0 = ours(shards, 0, args.batch_size, min(args.max_cells, 40_000), single_rows, every)
    print(f"ours (in-process, 0 workers): {rate0:,.0f} cells/s over {cells0:,} cells; {cpu0:,.0f} cells per CPU-second")
    srate, scells, scpu, setup = soma(store, vocab_path, args.obs_filter, args.workers, args.batch_size,
                                      args.soma_cells, soma_rows, every)
    print(f"tiledbsoma-ml ({args.workers} workers): {srate:,.0f} cells/s over {scells:,} cells (+{setup:.1f}s setup); "
          f"{scpu:,.0f} cells per CPU-second")

    common = sorted(set(ours_rows) & set(soma_rows))
    mismatched = [j for j in common if ours_rows[j] != soma_rows[j]]
    mismatched += [j for j in set(ours_rows) & set(single_rows) if ours_rows[j] != single_rows[j]]
    print(f"same tensors: {len(common) - len(mismatched)}/{len(common)} cells shared with the baseline identical")
    if mismatched or not common:
        raise SystemExit(f"loader_bench: tensors differ for cells {mismatched[:5]} (or no common cell)")

    results = {f"ours, {args.workers} workers": rate, "ours, in-process": rate0,
               f"tiledbsoma-ml, {args.workers} workers": srate}
    (OUT / "loader_bench.json").write_text(json.dumps({**results, "cells": cells, "batch_size": args.batch_size,
                                                        "ratio_vs_soma": rate / srate, "cells_per_cpu_s": cpu,
                                                        "soma_cells_per_cpu_s": scpu, "cores": os.cpu_count(),
                                                        "load_average": os.getloadavg()[0]}, indent=1))
    plot(results, OUT / "loader_bench.png")
    print(f"plot: {OUT / 'loader_bench.png'}")
    print(f"loader_bench cells_per_s={rate:.0f} ratio_vs_soma={rate / srate:.2f}")


if __name__ == "__main__":
    main()
