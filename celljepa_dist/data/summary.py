"""A look at a shard set: numbers (dict) and a PNG (genes per cell, bins, counts, cell types)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from celljepa_dist.atomic import save_png

from .shards import read_manifest, read_shard


def summarize_shards(shards_dir: str | Path, max_shards: int = 8) -> dict:
    """Statistics over the first `max_shards` shards (enough for a picture, cheap on big sets)."""
    shards_dir = Path(shards_dir)
    m = read_manifest(shards_dir)
    genes_per_cell, bins, counts, types = [], [], [], Counter()
    for s in m["shards"][:max_shards]:
        c = read_shard(shards_dir / s["name"])
        genes_per_cell.append(np.diff(c.offsets))
        bins.append(c.bins)
        counts.append(c.counts)
        types.update(c.meta.get("cell_type", []))
    g = np.concatenate(genes_per_cell) if genes_per_cell else np.zeros(0)
    n_bytes = sum((shards_dir / s["name"]).stat().st_size for s in m["shards"])
    return {"total_cells": m["total_cells"], "shards": len(m["shards"]), "n_bins": m["binning"]["n_bins"],
            "genes_per_cell_median": float(np.median(g)) if len(g) else 0.0,
            "bytes_per_expressed_gene": n_bytes / max(1, int(g.sum() * m["total_cells"] / max(len(g), 1))),
            "cell_types": dict(types.most_common()), "skipped": m["skipped"],
            "_genes_per_cell": g, "_bins": np.concatenate(bins) if bins else np.zeros(0),
            "_counts": np.concatenate(counts) if counts else np.zeros(0)}


def plot_shard_summary(summary: dict, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    ax[0, 0].hist(summary["_genes_per_cell"], bins=60, color="tab:blue")
    ax[0, 0].set(title="expressed genes per cell", xlabel="genes", ylabel="cells")
    nb = summary["n_bins"]
    ax[0, 1].bar(np.arange(1, nb), np.bincount(summary["_bins"], minlength=nb)[1:], color="tab:orange")
    ax[0, 1].set(title=f"quantile bins (1..{nb - 1})", xlabel="bin", ylabel="genes")
    c = summary["_counts"]
    ax[1, 0].hist(np.log10(c[c > 0]), bins=60, color="tab:green", log=True)
    ax[1, 0].set(title="raw counts of expressed genes", xlabel="log10 count", ylabel="genes")
    names = list(summary["cell_types"])[:15]
    ax[1, 1].barh(names[::-1], [summary["cell_types"][n] for n in names][::-1], color="tab:purple")
    ax[1, 1].set(title="cells per cell type (first shards)")
    ax[1, 1].tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{summary['total_cells']} cells in {summary['shards']} shards; "
                 f"{summary['bytes_per_expressed_gene']:.1f} bytes per expressed gene")
    fig.tight_layout()
    return save_png(fig, out_png, dpi=90)
