"""Raw counts with a perturbation column -> a GEARS data directory (what GEARS' PertData.new_data_process
does to Norman and Adamson), so any Perturb-seq h5ad can be used like the GEARS-processed sets.

1. conditions in GEARS' format: control labels -> 'ctrl', 'A' -> 'A+ctrl', 'A+B' stays;
2. X = log1p(normalize_total(counts, 1e4)) (the GEARS sets' X);
3. DE genes as GEARS' `get_DE_genes`: per cell type, `sc.tl.rank_genes_groups(groupby=condition_name,
   reference='{cell_type}_ctrl_1', rankby_abs=True, n_genes=all, use_raw=False)` (scanpy's default
   t-test) -> uns['rank_genes_groups_cov_all'];
4. GEARS' `get_dropout_non_zero_genes`: a gene is a dropout for p when its mean in p is 0 but its
   control mean is not; uns['top_non_dropout_de_20'] = the first 20 ranked DE genes that are not
   dropouts (also 'top_non_zero_de_20', 'non_dropout_gene_idx', 'non_zeros_gene_idx', as GEARS).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celljepa_dist.atomic import atomic_path

from .gears_data import CTRL, DE_KEY, GEARS_FILE, NON_DROPOUT_KEY, GearsDataError, check_conditions, condition_name


def to_gears_condition(label: str, control_labels: set[str], sep: str = "+") -> str:
    """One perturbation label in GEARS' format ('ctrl', 'A+ctrl', 'A+B')."""
    label = str(label)
    if label in control_labels or label == CTRL:
        return CTRL
    genes = [g for g in label.split(sep) if g and g != CTRL]
    if len(genes) == 1:
        return f"{genes[0]}+{CTRL}"
    if len(genes) == 2:
        return f"{genes[0]}+{genes[1]}"
    raise GearsDataError(f"perturbation label {label!r}: expected one or two genes separated by {sep!r} "
                         "(or a control label)")


def check_raw_counts(X, where: str) -> None:
    """Raw counts: finite, non-negative integers. Log-normalised input is the common mistake."""
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if not np.isfinite(data).all() or (data < 0).any():
        raise GearsDataError(f"{where}: holds negative or non-finite values; raw counts are needed")
    frac = data != np.round(data)
    if frac.any():
        example = float(data[np.flatnonzero(frac)[0]])
        raise GearsDataError(f"{where}: holds non-integer values (e.g. {example:.4g}): it looks log-normalised or "
                             "scaled; give raw counts (another layer with --layer, e.g. 'counts')")


def log_normalise(counts: sp.csr_matrix) -> sp.csr_matrix:
    """normalize_total(target_sum=1e4) then log1p, as scanpy computes them (float32)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return sp.csr_matrix(a.X, dtype=np.float32)


def rank_de_genes(adata) -> dict[str, np.ndarray]:
    """GEARS' rank_genes_groups_by_cov(groupby='condition_name', covariate='cell_type',
    control_group='ctrl_1', n_genes=all, rankby_abs=True): condition_name -> ranked gene ids."""
    import scanpy as sc

    out: dict[str, np.ndarray] = {}
    for cell_type in adata.obs["cell_type"].unique():
        sub = adata[adata.obs["cell_type"] == cell_type].copy()
        reference = f"{cell_type}_{CTRL}_1"
        if reference not in set(sub.obs["condition_name"]):
            raise GearsDataError(f"cell type {cell_type!r} has no control cells (condition 'ctrl'): DE genes are "
                                 "ranked against them")
        if sub.obs["condition_name"].nunique() < 2:
            continue
        with warnings.catch_warnings():  # scanpy's own DataFrame inserts, once per group
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
            sc.tl.rank_genes_groups(sub, groupby="condition_name", reference=reference, rankby_abs=True,
                                    n_genes=sub.n_vars, use_raw=False)
        names = pd.DataFrame(sub.uns["rank_genes_groups"]["names"])
        for group in names:
            out[str(group)] = np.asarray(names[group].astype(str).tolist(), dtype=object)
    return out


def dropout_filtered_de(X: sp.csr_matrix, conditions: np.ndarray, names: dict[str, str], gene_ids: np.ndarray,
                        ranked: dict[str, np.ndarray]) -> dict[str, dict]:
    """GEARS' get_dropout_non_zero_genes over `ranked` (condition_name -> ranked gene ids)."""
    pos = {g: i for i, g in enumerate(gene_ids)}
    ctrl = np.asarray(X[conditions == CTRL].mean(axis=0)).ravel()
    by_name = {n: c for c, n in names.items()}
    tables = {"top_non_dropout_de_20": {}, "non_dropout_gene_idx": {}, "non_zeros_gene_idx": {},
              "top_non_zero_de_20": {}}
    for name, top in ranked.items():
        mean = np.asarray(X[conditions == by_name[name]].mean(axis=0)).ravel()
        non_zero = np.flatnonzero(mean != 0)
        true_zeros = np.flatnonzero((mean == 0) & (ctrl == 0))
        non_dropouts = np.concatenate([non_zero, true_zeros])
        top_idx = np.array([pos[g] for g in top], dtype=np.int64)
        tables["top_non_dropout_de_20"][name] = gene_ids[top_idx[np.isin(top_idx, non_dropouts)][:20]].astype(str)
        tables["top_non_zero_de_20"][name] = gene_ids[top_idx[np.isin(top_idx, non_zero)][:20]].astype(str)
        tables["non_zeros_gene_idx"][name] = np.sort(non_zero)
        tables["non_dropout_gene_idx"][name] = np.sort(non_dropouts)
    return tables


def counts_to_gears(adata, perturbation_key: str, control_labels: list[str], cell_type_key: str | None = None,
                    cell_type: str = "cell", gene_name_key: str | None = None, layer: str | None = None,
                    sep: str = "+", where: str = "input"):
    """An AnnData of raw counts -> the GEARS-processed AnnData (a new object)."""
    import anndata as ad

    if perturbation_key not in adata.obs:
        raise GearsDataError(f"{where}: obs has no column {perturbation_key!r} (has {list(adata.obs.columns)})")
    if cell_type_key is not None and cell_type_key not in adata.obs:
        raise GearsDataError(f"{where}: obs has no column {cell_type_key!r}")
    if layer is not None and layer not in adata.layers:
        raise GearsDataError(f"{where}: no layer {layer!r} (layers: {list(adata.layers)})")
    counts = sp.csr_matrix(adata.layers[layer] if layer else adata.X)
    check_raw_counts(counts, f"{where}: {'layer ' + repr(layer) if layer else 'X'}")
    gene_names = adata.var[gene_name_key].astype(str).values if gene_name_key else adata.var_names.astype(str).values
    gene_ids = adata.var_names.astype(str).values
    controls = set(map(str, control_labels))
    conditions = np.asarray([to_gears_condition(v, controls, sep) for v in adata.obs[perturbation_key]], dtype=object)
    check_conditions(conditions, np.asarray(gene_names, dtype=object), Path(where))
    cell_types = (adata.obs[cell_type_key].astype(str).values if cell_type_key
                  else np.full(adata.n_obs, cell_type, dtype=object))
    names = np.asarray([condition_name(t, c) for t, c in zip(cell_types, conditions)], dtype=object)
    obs = pd.DataFrame({"condition": conditions, "cell_type": cell_types, "condition_name": names,
                        "dose_val": ["1+1" if len(c.split("+")) == 2 else "1" for c in conditions],
                        "control": [int(c == CTRL) for c in conditions]},
                       index=adata.obs_names.astype(str))
    var = pd.DataFrame({"gene_name": gene_names}, index=pd.Index(gene_ids, name="gene_id"))
    out = ad.AnnData(X=log_normalise(counts), obs=obs, var=var)
    out.layers["counts"] = sp.csr_matrix(counts, dtype=np.float32)
    ranked = rank_de_genes(out)
    out.uns[DE_KEY] = ranked
    cond_names = dict(zip(conditions, names))
    out.uns.update(dropout_filtered_de(out.X, conditions, cond_names, np.asarray(gene_ids, dtype=object), ranked))
    assert NON_DROPOUT_KEY in out.uns
    return out


def write_gears_dir(adata, out_dir: str | Path) -> Path:
    """`out_dir/perturb_processed.h5ad`, written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / GEARS_FILE
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path
