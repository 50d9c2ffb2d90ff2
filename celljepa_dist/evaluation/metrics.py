"""Embedding-quality metrics exactly as scib 1.1.5 defines them (and scGPT reports them).

scGPT's `eval_scib_metrics` calls `scib.metrics.metrics(..., nmi_=True, ari_=True,
silhouette_=True)` after `sc.pp.neighbors(adata, use_rep=embedding)` and reports
AvgBIO = mean(NMI_cluster/label, ARI_cluster/label, ASW_label). In scib 1.1.5 that is:
- kNN graph: scanpy `pp.neighbors(use_rep=key)` with its defaults (15 neighbours, euclidean,
  'umap' connectivities, random_state=0; exact kNN below 4,096 cells, pynndescent above);
- `opt_louvain`: `sc.tl.louvain` (random_state=0) at resolutions `[2 * x / 20 for x in range(1, 21)]`
  on that one graph, keeping the clustering with the best NMI (a later resolution wins only with a
  strictly higher NMI);
- NMI: sklearn `normalized_mutual_info_score(..., average_method="arithmetic")`;
- ARI: on the same clustering (scib's own contingency formula, equal to sklearn's
  `adjusted_rand_score`, which we call);
- label ASW: sklearn `silhouette_score(embedding, labels, metric="euclidean")`, rescaled (asw+1)/2;
- batch ASW (`silhouette_batch`): per label, `silhouette_samples` of the batch labels, 1 - |s|,
  averaged per label then over labels; labels with one batch, or as many batches as cells, skipped.
scib >= 1.1.6 clusters with Leiden instead (`cluster_optimal_resolution`); we follow 1.1.5.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples, silhouette_score
from tqdm import tqdm

# scib 1.1.5 opt_louvain's sweep, written the same way so the floats are bit-identical (0.30000000000000004
# and 0.3 are different resolutions to the Louvain package).
LOUVAIN_RESOLUTIONS: tuple[float, ...] = tuple(2 * x / 20 for x in range(1, 21))


def neighbors_key(embedding_key: str) -> str:
    """Where an embedding's kNN graph is kept in the user's AnnData (scanpy's `key_added` layout:
    uns[key], obsp[f"{key}_connectivities"], obsp[f"{key}_distances"])."""
    return f"neighbors_{embedding_key}"


@dataclass(frozen=True)
class ClusteringSweep:
    """The Louvain resolution sweep of one embedding and the clustering scib would keep."""

    resolutions: tuple[float, ...]
    nmi_per_resolution: tuple[float, ...]
    best_index: int
    best_clusters: np.ndarray  # str cluster ids per cell, as sc.tl.louvain writes them

    @property
    def best_resolution(self) -> float:
        return self.resolutions[self.best_index]

    @property
    def best_nmi(self) -> float:
        return self.nmi_per_resolution[self.best_index]


def _where(source: str) -> str:
    return f" in {source}" if source else ""


def check_labels(adata: ad.AnnData, label_key: str, source: str = "", what: str = "label") -> np.ndarray:
    """The obs column as a numpy array; KeyError/ValueError naming the key and file when unusable."""
    if label_key not in adata.obs.columns:
        raise KeyError(f"{what} key {label_key!r} not found in obs{_where(source)}; "
                       f"obs columns: {list(adata.obs.columns)}")
    column = adata.obs[label_key]
    missing = int(pd.isna(column).sum())
    if missing:
        raise ValueError(f"{what} key {label_key!r}{_where(source)}: {missing} of {adata.n_obs} cells have a "
                         f"missing (NaN/None) value; drop or fill them before evaluating")
    return column.to_numpy()


def check_label_classes(labels: np.ndarray, label_key: str, source: str = "") -> None:
    """A silhouette needs 2 <= classes <= cells - 1; fewer classes means nothing to evaluate."""
    n_classes = len(pd.unique(labels))
    if n_classes < 2:
        raise ValueError(f"label key {label_key!r}{_where(source)} has a single class "
                         f"({pd.unique(labels)[:1].tolist()}) over {len(labels)} cells; "
                         f"NMI/ARI/ASW need at least 2 cell types")
    if n_classes > len(labels) - 1:
        raise ValueError(f"label key {label_key!r}{_where(source)} has {n_classes} classes for {len(labels)} "
                         f"cells; the silhouette needs fewer classes than cells")


def check_embedding(embedding, embedding_key: str, n_obs: int, source: str = "") -> np.ndarray:
    """A 2-D finite array with one row per cell; ValueError naming the key and the file otherwise."""
    if hasattr(embedding, "toarray"):  # sparse obsm: the metrics need dense rows
        embedding = embedding.toarray()
    embedding = embedding.to_numpy() if isinstance(embedding, pd.DataFrame) else np.asarray(embedding)
    if embedding.ndim != 2:
        raise ValueError(f"embedding {embedding_key!r}{_where(source)} has shape {embedding.shape}; "
                         f"expected (cells, dims)")
    if embedding.shape[0] != n_obs:
        raise ValueError(f"embedding {embedding_key!r}{_where(source)} has {embedding.shape[0]} rows but the "
                         f"AnnData has {n_obs} cells (n_obs)")
    if not np.issubdtype(embedding.dtype, np.number):
        raise ValueError(f"embedding {embedding_key!r}{_where(source)} has non-numeric dtype {embedding.dtype}")
    bad_cells = int((~np.isfinite(embedding)).any(axis=1).sum())
    if bad_cells:
        raise ValueError(f"embedding {embedding_key!r}{_where(source)}: {bad_cells} of {n_obs} cells have "
                         f"NaN or inf values")
    return embedding


def get_embedding(adata: ad.AnnData, embedding_key: str, source: str = "") -> np.ndarray:
    if embedding_key not in adata.obsm:
        raise KeyError(f"embedding key {embedding_key!r} not found in obsm{_where(source)}; "
                       f"obsm keys: {list(adata.obsm.keys())}")
    return check_embedding(adata.obsm[embedding_key], embedding_key, adata.n_obs, source)


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    return float(normalized_mutual_info_score(labels, clusters, average_method="arithmetic"))


def ari(labels: np.ndarray, clusters: np.ndarray) -> float:
    return float(adjusted_rand_score(labels, clusters))


def label_asw(embedding: np.ndarray, labels: np.ndarray) -> float:
    """scib `silhouette(..., scale=True)`: the embedding as stored (no dtype change, so float32 stays
    float32 exactly as scib passes obsm to sklearn)."""
    return float((silhouette_score(embedding, labels, metric="euclidean") + 1) / 2)


def batch_asw(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """scib 1.1.5 `silhouette_batch(scale=True)`; NaN when no label has 2..n-1 batches.

    Averaged the way scib does (per-cell widths kept in the embedding's dtype, a pandas groupby
    mean per label, then the mean over labels): with float32 embeddings a plain numpy mean differs
    from scib's number in the 8th decimal.
    """
    groups, widths = [], []
    for label in pd.unique(labels):
        in_label = labels == label
        label_batches = batches[in_label]
        n_batches = len(pd.unique(label_batches))
        if n_batches == 1 or n_batches == int(in_label.sum()):
            continue
        silhouettes = silhouette_samples(embedding[in_label], label_batches, metric="euclidean")
        widths.append(1 - np.abs(silhouettes))
        groups.append(np.full(len(silhouettes), label, dtype=object))
    if not widths:
        return float("nan")
    per_cell = pd.DataFrame({"group": np.concatenate(groups), "silhouette_score": np.concatenate(widths)})
    return float(per_cell.groupby("group").mean()["silhouette_score"].mean())


def knn_graph(embedding: np.ndarray, embedding_key: str) -> ad.AnnData:
    """A cells-only AnnData holding the embedding and scanpy's default kNN graph of it.

    Built apart from the user's AnnData so that Louvain's 20 obs columns and scanpy's uns entries
    never land there; scanpy reads only obsm[use_rep], so the graph is the one scib computes.
    """
    import scanpy as sc

    graph = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(embedding.shape[0]).astype(str)),
                       obsm={embedding_key: embedding})
    sc.pp.neighbors(graph, use_rep=embedding_key)
    return graph


def louvain_sweep(graph: ad.AnnData, labels: np.ndarray, resolutions: tuple[float, ...] = LOUVAIN_RESOLUTIONS,
                  progress: bool = False) -> ClusteringSweep:
    """scib 1.1.5 opt_louvain on a graph from `knn_graph`: first resolution with the strictly best NMI.

    (If every NMI is 0, scib keeps no clustering and its ARI then fails; we keep the first one.)
    """
    import scanpy as sc

    scores: list[float] = []
    best_index, best_score, best_clusters = 0, 0.0, None
    for i, resolution in enumerate(tqdm(resolutions, desc="louvain", leave=False, disable=not progress)):
        sc.tl.louvain(graph, resolution=resolution, key_added="louvain")
        clusters = graph.obs["louvain"].to_numpy().astype(str)
        score = nmi(labels, clusters)
        scores.append(score)
        if best_clusters is None or score > best_score:
            best_index, best_score, best_clusters = i, score, clusters
    return ClusteringSweep(tuple(resolutions), tuple(scores), best_index, best_clusters)


def embedding_metrics(embedding: np.ndarray, labels: np.ndarray, embedding_key: str,
                      batches: np.ndarray | None = None, progress: bool = False) -> tuple[dict[str, float], ad.AnnData]:
    """NMI, ARI, ASW, AvgBIO (+ batch ASW) of one checked embedding, and the kNN graph they used."""
    graph = knn_graph(embedding, embedding_key)
    sweep = louvain_sweep(graph, labels, progress=progress)
    scores = {"nmi": sweep.best_nmi, "ari": ari(labels, sweep.best_clusters), "asw": label_asw(embedding, labels)}
    scores["avgbio"] = float(np.mean([scores["nmi"], scores["ari"], scores["asw"]]))
    if batches is not None:
        scores["batch_asw"] = batch_asw(embedding, labels, batches)
    scores.update({"louvain_resolution": sweep.best_resolution,
                   "n_clusters": float(len(np.unique(sweep.best_clusters))),
                   "n_cells": float(embedding.shape[0]), "n_dims": float(embedding.shape[1])})
    return scores, graph


def progress_enabled() -> bool:
    return sys.stderr.isatty()
