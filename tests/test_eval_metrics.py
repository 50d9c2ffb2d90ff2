"""Embedding metrics against hand-computed cases and naive re-implementations of scib 1.1.5."""
from __future__ import annotations

import math
from itertools import combinations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celljepa_dist.evaluation import evaluate_embeddings, markdown_table
from celljepa_dist.evaluation.baselines import is_integer_counts, pca_baseline
from celljepa_dist.evaluation.metrics import (
    LOUVAIN_RESOLUTIONS,
    ari,
    batch_asw,
    check_embedding,
    label_asw,
    nmi,
)

# louvain 0.8 imports pkg_resources (deprecated): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")


# --- naive references (written from the definitions, no sklearn) --------------------------------
def naive_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def naive_nmi(a, b) -> float:
    """Mutual information over the arithmetic mean of the two entropies."""
    table = pd.crosstab(np.asarray(a), np.asarray(b)).to_numpy().astype(float)
    n = table.sum()
    pa, pb = table.sum(1) / n, table.sum(0) / n
    mi = sum(table[i, j] / n * math.log((table[i, j] / n) / (pa[i] * pb[j]))
             for i in range(table.shape[0]) for j in range(table.shape[1]) if table[i, j] > 0)
    h = (naive_entropy(table.sum(1)) + naive_entropy(table.sum(0))) / 2
    return 1.0 if h == 0 else mi / h


def naive_ari(a, b) -> float:
    """Hubert & Arabie's adjusted Rand index by counting agreeing pairs."""
    a, b = np.asarray(a), np.asarray(b)
    n = len(a)
    pairs = list(combinations(range(n), 2))
    same_a = np.array([a[i] == a[j] for i, j in pairs])
    same_b = np.array([b[i] == b[j] for i, j in pairs])
    index, sum_a, sum_b, total = (same_a & same_b).sum(), same_a.sum(), same_b.sum(), len(pairs)
    expected = sum_a * sum_b / total
    return float((index - expected) / ((sum_a + sum_b) / 2 - expected))


def naive_silhouettes(x: np.ndarray, labels) -> np.ndarray:
    """Per-cell silhouette from an explicit distance matrix (singleton clusters score 0, as sklearn)."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    widths = np.zeros(len(x))
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == other].mean() for other in np.unique(labels) if other != labels[i])
        widths[i] = (b - a) / max(a, b)
    return widths


def naive_batch_asw(x, labels, batches) -> float:
    """scib 1.1.5 silhouette_batch(scale=True) from its docstring: per label 1 - |s| of the batch
    silhouette, mean per label, then mean over labels with 2..n-1 batches."""
    means = []
    for label in np.unique(labels):
        sel = labels == label
        k = len(np.unique(batches[sel]))
        if k == 1 or k == sel.sum():
            continue
        means.append(np.mean(1 - np.abs(naive_silhouettes(x[sel], batches[sel]))))
    return float(np.mean(means)) if means else float("nan")


# --- data ---------------------------------------------------------------------------------------
def blobs(n_per: int = 60, n_types: int = 3, dims: int = 6, spread: float = 1.0, sep: float = 50.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_types, dims)) * sep
    labels = np.repeat([f"type{i}" for i in range(n_types)], n_per)
    x = np.concatenate([c + rng.normal(size=(n_per, dims)) * spread for c in centers]).astype(np.float32)
    return x, labels


def make_adata(x: np.ndarray, labels, key: str = "X_emb", **obs) -> ad.AnnData:
    adata = ad.AnnData(X=sp.csr_matrix(np.abs(x)), obs=pd.DataFrame({"cell_type": labels, **obs},
                                                                    index=[f"c{i}" for i in range(len(x))]))
    adata.obsm[key] = x
    return adata


# --- hand-computed cases ------------------------------------------------------------------------
def test_perfectly_separated_clusters_score_one():
    x, labels = blobs()
    res = evaluate_embeddings(make_adata(x, labels), "cell_type", ["X_emb"], baseline=None)["X_emb"]
    assert res["nmi"] == pytest.approx(1.0) and res["ari"] == pytest.approx(1.0)
    assert res["asw"] > 0.95  # (s+1)/2 with intra-blob spread 1 and centres ~50 apart
    assert res["avgbio"] == pytest.approx((res["nmi"] + res["ari"] + res["asw"]) / 3)
    assert res["n_clusters"] == 3 and res["n_cells"] == 180
    # Three kNN components cannot merge: the first resolution already has the best NMI.
    assert res["louvain_resolution"] == LOUVAIN_RESOLUTIONS[0]


def test_labels_independent_of_structure_score_low():
    x, _ = blobs(n_per=80)
    labels = np.random.default_rng(1).choice(["a", "b", "c"], size=len(x))
    res = evaluate_embeddings(make_adata(x, labels), "cell_type", ["X_emb"], baseline=None)["X_emb"]
    assert res["nmi"] < 0.1 and abs(res["ari"]) < 0.05
    assert 0.4 < res["asw"] < 0.55  # silhouette ~0 (slightly negative) -> ~0.5 after rescaling
    assert res["avgbio"] < 0.25


def test_metric_functions_match_naive_definitions():
    rng = np.random.default_rng(2)
    a = rng.choice(list("abcd"), size=70)
    b = np.where(rng.random(70) < 0.6, a, rng.choice(list("xyz"), size=70))
    assert nmi(a, b) == pytest.approx(naive_nmi(a, b), abs=1e-12)
    assert ari(a, b) == pytest.approx(naive_ari(a, b), abs=1e-12)
    x = rng.normal(size=(70, 4))
    assert label_asw(x, a) == pytest.approx((naive_silhouettes(x, a).mean() + 1) / 2, abs=1e-9)
    assert nmi(a, a) == pytest.approx(1.0) and ari(a, a) == pytest.approx(1.0)


def test_batch_asw_matches_naive_scib_definition():
    x, labels = blobs(n_per=30, spread=3.0, sep=8.0, seed=3)
    rng = np.random.default_rng(3)
    batches = rng.choice(["b1", "b2", "b3"], size=len(x))
    batches[labels == "type2"] = "b1"  # one batch only: skipped, as scib does
    # float32 embedding (as obsm usually is): sklearn's float32 distances vs our float64 ones.
    assert batch_asw(x, labels, batches) == pytest.approx(naive_batch_asw(x, labels, batches), abs=1e-6)
    assert math.isnan(batch_asw(x, labels, np.full(len(x), "b1")))
    res = evaluate_embeddings(make_adata(x, labels, batch=batches), "cell_type", ["X_emb"], baseline=None,
                              batch_key="batch")["X_emb"]
    assert res["batch_asw"] == pytest.approx(naive_batch_asw(x, labels, batches), abs=1e-6)


def test_scores_and_best_resolution_match_a_naive_sweep():
    """Overlapping blobs so the sweep matters; recompute scib's opt_louvain loop from scratch."""
    import scanpy as sc

    x, labels = blobs(n_per=70, n_types=4, dims=5, spread=4.0, sep=5.0, seed=4)
    res = evaluate_embeddings(make_adata(x, labels), "cell_type", ["X_emb"], baseline=None)["X_emb"]

    fresh = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(len(x))]), obsm={"e": x})
    sc.pp.neighbors(fresh, use_rep="e")
    resolutions = [2 * r / 20 for r in range(1, 21)]
    sweep = []
    for r in resolutions:
        sc.tl.louvain(fresh, resolution=r, key_added="cl")
        clusters = fresh.obs["cl"].astype(str).to_numpy()
        sweep.append((naive_nmi(labels, clusters), clusters))
    scores = [s for s, _ in sweep]
    best = int(np.argmax(scores))  # first maximum, as scib's `score_max < score`
    assert len(set(np.round(scores, 6))) > 3, "the sweep should give different clusterings"
    assert res["louvain_resolution"] == resolutions[best]
    assert res["nmi"] == pytest.approx(scores[best], abs=1e-12)
    assert res["ari"] == pytest.approx(naive_ari(labels, sweep[best][1]), abs=1e-12)
    assert res["asw"] == pytest.approx((naive_silhouettes(x, labels).mean() + 1) / 2, abs=1e-6)
    assert res["n_clusters"] == len(np.unique(sweep[best][1]))


def test_deterministic_across_calls():
    x, labels = blobs(n_per=50, n_types=4, spread=4.0, sep=5.0, seed=5)
    first = evaluate_embeddings(make_adata(x, labels), "cell_type", ["X_emb"], baseline=None)
    second = evaluate_embeddings(make_adata(x, labels), "cell_type", ["X_emb"], baseline=None)
    assert first == second


# --- baseline -----------------------------------------------------------------------------------
def test_is_integer_counts():
    assert is_integer_counts(sp.csr_matrix(np.array([[0, 3.0], [1.0, 0]])))
    assert not is_integer_counts(sp.csr_matrix(np.array([[0, 0.5], [1.0, 0]])))
    assert not is_integer_counts(np.array([[-1.0, 2.0]]))


def test_pca_baseline_normalises_counts_like_a_manual_pipeline():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(6)
    counts = rng.poisson(rng.gamma(0.5, 2.0, size=(1, 120)) * rng.uniform(0.5, 3, size=(150, 1))).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    base = pca_baseline(adata)
    assert base.key == "X_pca" and base.embedding.shape == (150, 50)
    assert "integer counts" in base.note and "all 120 genes" in base.note
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    ref = PCA(n_components=5, svd_solver="full").fit_transform(lognorm)
    for pc in range(5):  # the same components up to sign
        corr = np.corrcoef(base.embedding[:, pc], ref[:, pc])[0, 1]
        assert abs(corr) > 0.999, (pc, corr)
    assert adata.X.max() == counts.max()  # the input is left alone


@pytest.mark.parametrize("name,label_key,expected,x_kind", [
    ("pbmc3k_clustifyr", "classified", 0.723, "non-integer"),
    ("kang2018_pbmc_scgen", "cell_type", 0.542, "non-integer"),
    ("baron2016_pancreas_came", "cell_ontology_class", 0.805, "integer counts"),
])
def test_pca_baseline_reproduces_provenance_avgbio(shared_data, name, label_key, expected, x_kind):
    """PROVENANCE: AvgBIO of a 50-PC PCA (2,000 HVG; scib 1.1.5 Louvain sweep).

    The figures are rounded to 3 decimals (+-0.0005); here we get 0.72293, 0.54238 and 0.80497.
    Tolerance 0.002: that rounding plus BLAS-level float noise in PCA and the silhouette. A different
    pipeline does not fit in it (Leiden, scaled data, or no log of counts move AvgBIO by 0.01-0.05)."""
    adata = ad.read_h5ad(shared_data / f"{name}.h5ad")
    res = evaluate_embeddings(adata, label_key, [], baseline="pca")
    assert set(res) == {"X_pca"} and adata.obsm["X_pca"].shape == (adata.n_obs, 50)
    assert res["X_pca"]["avgbio"] == pytest.approx(expected, abs=0.002)
    assert x_kind in adata.uns["celljepa_eval"]["baseline_note"]


# --- report table -------------------------------------------------------------------------------
def test_markdown_table_puts_baseline_first_and_flags_losers():
    def row(nmi_, ari_, asw_, avgbio, resolution, clusters):
        return {"nmi": nmi_, "ari": ari_, "asw": asw_, "avgbio": avgbio, "louvain_resolution": resolution,
                "n_clusters": clusters}

    results = {"X_model": row(0.5, 0.4, 0.6, 0.5, 0.4, 7), "X_good": row(0.9, 0.8, 0.7, 0.8, 1.0, 9),
               "X_pca": row(0.8, 0.7, 0.6, 0.7, 0.8, 8)}
    lines = markdown_table(results).splitlines()
    assert lines[0].startswith("| embedding | NMI | ARI | ASW | AvgBIO |") and "vs PCA" in lines[0]
    assert lines[2].startswith("| `X_pca` |") and lines[2].endswith("| baseline |")
    assert "**loses to PCA** (-0.2000)" in lines[3] and "beats PCA (+0.1000)" in lines[4]
    no_baseline = markdown_table({"X_model": results["X_model"]})
    assert "vs PCA" not in no_baseline


# --- bad input ----------------------------------------------------------------------------------
def _small():
    x, labels = blobs(n_per=10)
    return make_adata(x, labels)


def test_missing_label_key_lists_obs_columns():
    with pytest.raises(KeyError, match=r"'celltype'.*in data.h5ad.*obs columns: \['cell_type'\]"):
        evaluate_embeddings(_small(), "celltype", ["X_emb"], baseline=None, source="data.h5ad")


def test_missing_embedding_key_lists_obsm_keys():
    with pytest.raises(KeyError, match=r"'X_scgpt'.*obsm keys: \['X_emb'\]"):
        evaluate_embeddings(_small(), "cell_type", ["X_scgpt"], baseline=None)


def test_single_label_class_refused():
    adata = _small()
    adata.obs["cell_type"] = "T cell"
    with pytest.raises(ValueError, match="single class"):
        evaluate_embeddings(adata, "cell_type", ["X_emb"], baseline=None)


def test_nan_and_inf_in_embedding_counted():
    adata = _small()
    adata.obsm["X_emb"][[1, 4], 0] = np.nan
    adata.obsm["X_emb"][7, 2] = np.inf
    adata.obsm["X_emb"][4, 3] = np.inf  # same cell as a NaN: still one cell
    with pytest.raises(ValueError, match=r"'X_emb'.*3 of 30 cells have NaN or inf"):
        evaluate_embeddings(adata, "cell_type", ["X_emb"], baseline=None)


def test_missing_labels_counted():
    adata = _small()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[[0, 5], 0] = None
    with pytest.raises(ValueError, match=r"'cell_type'.*2 of 30 cells have a missing"):
        evaluate_embeddings(adata, "cell_type", ["X_emb"], baseline=None)


def test_embedding_row_count_must_match_n_obs():
    with pytest.raises(ValueError, match=r"'X_emb' in f.h5ad has 29 rows but the AnnData has 30 cells"):
        check_embedding(np.zeros((29, 4)), "X_emb", 30, "f.h5ad")


def test_embedding_named_like_the_baseline_refused():
    adata = _small()
    adata.obsm["X_pca"] = adata.obsm["X_emb"]
    with pytest.raises(ValueError, match="'X_pca' is where the pca baseline is stored"):
        evaluate_embeddings(adata, "cell_type", ["X_pca"], baseline="pca")
