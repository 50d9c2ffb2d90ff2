"""Evaluation outputs: metrics.json, metrics.md (baseline beside every model, and whether the model
beats it), umap.png (one panel per embedding, coloured by label). Every file is written atomically.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from tqdm import tqdm

from celljepa_dist.atomic import atomic_write_text, save_png
from celljepa_dist.evaluation.baselines import BASELINE_KEYS
from celljepa_dist.evaluation.metrics import get_embedding, knn_graph, neighbors_key, progress_enabled

BASELINE_KEY = BASELINE_KEYS["pca"]
TABLE_METRICS = ("nmi", "ari", "asw", "avgbio")
# The UMAP is only a picture: 200 epochs (umap-learn's choice above 10k cells) instead of its 500 for
# small data saves ~3 s per embedding at 2.6k cells and changes nothing a reader can see.
UMAP_EPOCHS = 200


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _row_order(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    return sorted(results, key=lambda key: key != BASELINE_KEY)  # baseline first, models in given order


def versus_baseline(avgbio: float, baseline_avgbio: float) -> str:
    """The verdict column: a model that loses to its baseline says so."""
    delta = avgbio - baseline_avgbio
    if delta > 0:
        return f"beats PCA ({delta:+.4f})"
    if delta == 0:
        return "ties PCA (+0.0000)"
    return f"**loses to PCA** ({delta:+.4f})"


def markdown_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """One row per embedding, the PCA baseline first; a `vs PCA` AvgBIO verdict when it is present
    and a batch ASW column when any entry has one."""
    with_batch = any("batch_asw" in scores for scores in results.values())
    baseline = results.get(BASELINE_KEY)
    header = ["embedding", "NMI", "ARI", "ASW", "AvgBIO"] + (["batch ASW"] if with_batch else [])
    header += ["Louvain res.", "clusters"] + (["vs PCA (AvgBIO)"] if baseline is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key in _row_order(results):
        scores = results[key]
        row = [f"`{key}`"] + [_fmt(scores.get(m)) for m in TABLE_METRICS]
        if with_batch:
            row.append(_fmt(scores.get("batch_asw")))
        row += [f"{scores.get('louvain_resolution', float('nan')):.1f}", f"{int(scores.get('n_clusters', 0))}"]
        if baseline is not None:
            row.append("baseline" if key == BASELINE_KEY else versus_baseline(scores["avgbio"], baseline["avgbio"]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(results: Mapping[str, Mapping[str, float]], adata: ad.AnnData, label_key: str) -> str:
    notes = dict(adata.uns.get("celljepa_eval", {}))
    n_labels = adata.obs[label_key].nunique()
    lines = [f"# Embedding evaluation ({adata.n_obs} cells, label `{label_key}`: {n_labels} classes)", "",
             markdown_table(results),
             "AvgBIO = mean(NMI, ARI, ASW) as scib 1.1.5 / scGPT: Louvain sweep 0.1..2.0 on scanpy's kNN graph, "
             "best-NMI clustering, label ASW rescaled (asw+1)/2."]
    if notes.get("source"):
        lines.append(f"Cells: `{notes['source']}`.")
    if notes.get("batch_key"):
        lines.append(f"Batch ASW (scib silhouette_batch, 1 = well mixed) over batch key `{notes['batch_key']}`.")
    if notes.get("baseline_note"):
        lines.append(f"PCA baseline: {notes['baseline_note']}.")
    elif BASELINE_KEY not in results:
        lines.append("No baseline computed: nothing to compare these embeddings against.")
    return "\n".join(lines) + "\n"


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN
    return value


def metrics_json(results: Mapping[str, Mapping[str, float]]) -> str:
    ordered = {key: {name: _json_value(v) for name, v in results[key].items()} for key in _row_order(results)}
    return json.dumps(ordered, indent=2, allow_nan=False) + "\n"


def umap_coordinates(adata: ad.AnnData, embedding_key: str) -> np.ndarray:
    """scanpy UMAP (random_state=0, UMAP_EPOCHS) on the kNN graph evaluate_embeddings stored;
    built here if absent (write_report called on an AnnData that was not evaluated in this process)."""
    import scanpy as sc

    key = neighbors_key(embedding_key)
    embedding = get_embedding(adata, embedding_key)
    if key in adata.uns and f"{key}_connectivities" in adata.obsp:
        graph = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(adata.n_obs).astype(str)),
                           obsm={embedding_key: embedding},
                           obsp={"connectivities": adata.obsp[f"{key}_connectivities"],
                                 "distances": adata.obsp[f"{key}_distances"]},
                           uns={"neighbors": {**adata.uns[key], "connectivities_key": "connectivities",
                                              "distances_key": "distances"}})
    else:
        graph = knn_graph(embedding, embedding_key)
    sc.tl.umap(graph, maxiter=UMAP_EPOCHS)
    return np.asarray(graph.obsm["X_umap"])


def _label_colors(categories: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if len(categories) <= 20 else "gist_ncar"]
    n = max(len(categories), 1)
    return {c: cmap(i if len(categories) <= 20 else i / n) for i, c in enumerate(categories)}


def plot_umaps(coordinates: Mapping[str, np.ndarray], labels: np.ndarray, titles: Mapping[str, str],
               label_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(coordinates)
    categories = sorted(pd.unique(labels).astype(str).tolist())
    colors = _label_colors(categories)
    label_text = labels.astype(str)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys) + 2.4, 4.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xy = coordinates[key]
        for category in categories:
            mask = label_text == category
            ax.scatter(xy[mask, 0], xy[mask, 1], s=3, color=colors[category], label=category, linewidths=0,
                       rasterized=True)
        ax.set_title(titles[key], fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel("UMAP1"), ax.set_ylabel("UMAP2")
    axes[0][-1].legend(title=label_key, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7,
                       markerscale=3, frameon=False, ncol=1 if len(categories) <= 25 else 2)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def write_report(results: Mapping[str, Mapping[str, float]], adata: ad.AnnData, label_key: str,
                 out_dir: str | Path) -> dict[str, Path]:
    """metrics.json, metrics.md and umap.png in out_dir (atomic writes); returns {file name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / name for name in ("metrics.json", "metrics.md", "umap.png")}
    atomic_write_text(files["metrics.json"], metrics_json(results))
    atomic_write_text(files["metrics.md"], report_markdown(results, adata, label_key))
    keys = _row_order(results)
    coordinates = {key: umap_coordinates(adata, key)
                   for key in tqdm(keys, desc="umap", disable=not progress_enabled())}
    titles = {key: f"{key}\nAvgBIO {_fmt(results[key]['avgbio'])}" for key in keys}
    plot_umaps(coordinates, adata.obs[label_key].to_numpy(), titles, label_key, files["umap.png"])
    return files
