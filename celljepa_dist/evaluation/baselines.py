"""The PCA baseline every model embedding is shown beside.

Computed as the PROVENANCE reference AvgBIO of /work/shared/data was (and as scib's usual
preprocessing does): log-normalise counts (normalize_total 1e4 + log1p) unless X already is
log-normalised, 2,000 highly variable genes (scanpy's default 'seurat' flavour; all genes when
there are no more than 2,000), then scanpy PCA with 50 components (arpack, random_state=0).
This reproduces the PROVENANCE figures: PBMC 3k 0.7229 (0.723), Kang 0.5424 (0.542),
Baron 0.8050 (0.805).
"""
from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

BASELINE_KEYS = {"pca": "X_pca"}
N_TOP_GENES = 2000
N_COMPONENTS = 50


@dataclass(frozen=True)
class Baseline:
    key: str
    embedding: np.ndarray
    note: str  # how X was used, for the report


def is_integer_counts(x) -> bool:
    """True when every stored value is a non-negative integer (raw counts)."""
    values = x.data if sp.issparse(x) else np.asarray(x)
    return bool(values.size == 0 or (np.all(values >= 0) and np.all(np.mod(values, 1) == 0)))


def pca_baseline(adata: ad.AnnData, source: str = "", n_top_genes: int = N_TOP_GENES,
                 n_components: int = N_COMPONENTS) -> Baseline:
    """50-PC PCA of (log-normalised) X on the highly variable genes; adata is not modified."""
    import scanpy as sc

    where = f" in {source}" if source else ""
    if adata.X is None:
        raise ValueError(f"--baseline pca needs an expression matrix X, but X is empty{where}")
    if adata.n_obs < 3 or adata.n_vars < 2:
        raise ValueError(f"--baseline pca needs at least 3 cells and 2 genes{where}; got {adata.shape}")
    x = adata.X.astype(np.float32) if np.issubdtype(adata.X.dtype, np.integer) else adata.X.copy()
    work = ad.AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names))
    if is_integer_counts(work.X):
        sc.pp.normalize_total(work, target_sum=1e4)
        sc.pp.log1p(work)
        note = "X holds integer counts: normalize_total(1e4) + log1p before HVG/PCA"
    else:
        note = "X is non-integer (already log-normalised): used as is, no normalisation"
    if work.n_vars > n_top_genes:
        sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes)
        work = work[:, work.var["highly_variable"].to_numpy()].copy()
        note += f"; {n_top_genes} highly variable genes of {adata.n_vars}"
    else:
        note += f"; all {work.n_vars} genes (no more than {n_top_genes})"
    # arpack (scanpy's choice here) cannot return min(shape) components.
    n_comps = min(n_components, work.n_obs - 1, work.n_vars - 1)
    sc.pp.pca(work, n_comps=n_comps)
    note += f"; {n_comps} PCs"
    return Baseline(key=BASELINE_KEYS["pca"], embedding=np.asarray(work.obsm["X_pca"]), note=note)


def compute_baseline(name: str, adata: ad.AnnData, source: str = "") -> Baseline:
    if name not in BASELINE_KEYS:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINE_KEYS)}")
    return pca_baseline(adata, source)
