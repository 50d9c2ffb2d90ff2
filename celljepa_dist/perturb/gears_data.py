"""GEARS-processed perturbation data as users have it: `DIR/perturb_processed.h5ad`.

What GEARS (`gears/pertdata.py`, `gears/data_utils.py`) leaves in that file and we rely on:

    obs['condition']       'ctrl', 'A+ctrl' (or 'ctrl+A'): one gene, 'A+B': two genes
    obs['cell_type']       the covariate of GEARS' DE test (one cell line: one value)
    obs['condition_name']  '{cell_type}_{condition}_1+1' ('..._ctrl_1'; derived as GEARS does when absent)
    var.index              gene ids (Ensembl); var['gene_name'] the symbols conditions are written in
    X                      log-normalised expression (normalize_total to 1e4, log1p), cells x genes
    uns['rank_genes_groups_cov_all']  condition_name -> gene ids ranked by |t| against control
    uns['top_non_dropout_de_20']      condition_name -> the first 20 of those that are not dropouts

`load_gears_dir` reads and validates it; every error names the file and the condition, gene or
key at fault. Conditions are parsed exactly as GEARS' `parse_any_pert` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

GEARS_FILE = "perturb_processed.h5ad"
CTRL = "ctrl"
DE_KEY = "rank_genes_groups_cov_all"
NON_DROPOUT_KEY = "top_non_dropout_de_20"
REQUIRED_OBS = ("condition", "cell_type")
REQUIRED_UNS = (DE_KEY, NON_DROPOUT_KEY)
# Log-normalised values (log1p of counts per 1e4) stay below ~12; counts are integers and, in
# any real cell, some exceed this.
COUNTS_LOOKING_MAX = 30.0


class GearsDataError(ValueError):
    """The GEARS directory is not usable; the message names the file and what is wrong."""


def parse_condition(condition: str) -> tuple[str, ...]:
    """GEARS' parse_any_pert, strict: 'ctrl' -> (), 'A+ctrl' / 'ctrl+A' -> ('A',), 'A+B' -> ('A', 'B').

    Anything else ('A', 'A+B+C', '', 'ctrl+ctrl') raises ValueError naming the condition."""
    if condition == CTRL:
        return ()
    parts = str(condition).split("+")
    if len(parts) != 2 or not all(parts) or parts == [CTRL, CTRL]:
        raise ValueError(f"condition {condition!r} is not 'ctrl', 'GENE+ctrl' or 'GENE1+GENE2' (GEARS' format)")
    return tuple(p for p in parts if p != CTRL)


def is_combo(condition: str) -> bool:
    return len(parse_condition(condition)) == 2


def condition_name(cell_type: str, condition: str) -> str:
    """GEARS' `get_DE_genes`: '{cell_type}_{condition}_{dose}', dose '1+1' when the condition has two
    '+'-separated parts (every perturbation, 'A+ctrl' included) and '1' for 'ctrl'."""
    return "_".join([cell_type, condition, "1+1" if len(condition.split("+")) == 2 else "1"])


@dataclass
class GearsData:
    path: Path  # the h5ad file (for error messages)
    X: sp.csr_matrix  # cells x genes, float32, log-normalised
    conditions: np.ndarray  # per cell, str
    cell_types: np.ndarray  # per cell, str
    gene_ids: np.ndarray  # var.index, str
    gene_names: np.ndarray  # var['gene_name'], str
    condition_names: dict[str, str]  # condition -> condition_name (the uns keys)
    de_genes: dict[str, np.ndarray]  # condition_name -> ranked gene ids
    non_dropout_de: dict[str, np.ndarray]  # condition_name -> <= 20 gene ids
    _rows: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._gene_pos = {g: i for i, g in enumerate(self.gene_ids)}
        self._name_pos: dict[str, int] = {}
        for i, name in enumerate(self.gene_names):
            self._name_pos.setdefault(str(name), i)
        order = np.argsort(self.conditions, kind="stable")
        uniq, starts = np.unique(self.conditions[order], return_index=True)
        bounds = list(starts[1:]) + [len(order)]
        self._rows = {str(c): np.sort(order[a:b]) for c, a, b in zip(uniq, starts, bounds)}

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    @property
    def perturbations(self) -> list[str]:
        """Every condition except 'ctrl', in sorted order."""
        return sorted(c for c in self._rows if c != CTRL)

    @property
    def perturbed_genes(self) -> list[str]:
        return sorted({g for c in self.perturbations for g in parse_condition(c)})

    def rows(self, condition: str) -> np.ndarray:
        """Row indices of the cells of `condition` (sorted)."""
        if condition not in self._rows:
            raise KeyError(f"{self.path}: no cells of condition {condition!r}")
        return self._rows[condition]

    def gene_index(self, name: str) -> int:
        """Column of the gene whose var['gene_name'] is `name` (the first such column)."""
        if name not in self._name_pos:
            raise KeyError(f"{self.path}: gene {name!r} is not in var['gene_name']")
        return self._name_pos[name]

    def condition_gene_idx(self, condition: str) -> np.ndarray:
        return np.array([self.gene_index(g) for g in parse_condition(condition)], dtype=np.int64)

    def _gene_positions(self, ids, what: str, condition: str) -> np.ndarray:
        try:
            return np.array([self._gene_pos[str(g)] for g in ids], dtype=np.int64)
        except KeyError as err:
            raise GearsDataError(f"{self.path}: uns['{what}'][{self.condition_names[condition]!r}] names gene id "
                                 f"{err.args[0]!r}, which is not in var.index") from None

    def de_idx(self, condition: str, n: int = 20) -> np.ndarray:
        """Columns of the top-n DE genes of `condition` (uns['rank_genes_groups_cov_all'])."""
        return self._gene_positions(self.de_genes[self.condition_names[condition]][:n], DE_KEY, condition)

    def non_dropout_idx(self, condition: str) -> np.ndarray:
        """Columns of uns['top_non_dropout_de_20'] of `condition`."""
        return self._gene_positions(self.non_dropout_de[self.condition_names[condition]], NON_DROPOUT_KEY, condition)

    def mean(self, condition: str) -> np.ndarray:
        """Mean expression of the condition's cells (float64 [G])."""
        return np.asarray(self.X[self.rows(condition)].mean(axis=0), dtype=np.float64).ravel()

    def control_mean(self) -> np.ndarray:
        """The mean control cell over all control cells (GEARS' `ctrl` in deeper_analysis)."""
        return self.mean(CTRL)

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.X[rows].toarray(), dtype=np.float32)


def _as_str_array(values) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


def _check_values_log_normalised(X: sp.csr_matrix, path: Path) -> None:
    data = X.data
    if len(data) == 0:
        raise GearsDataError(f"{path}: X has no non-zero value")
    if not np.isfinite(data).all():
        raise GearsDataError(f"{path}: X holds non-finite values")
    if (data < 0).any():
        raise GearsDataError(f"{path}: X holds negative values ({data.min()}); GEARS' X is log1p-normalised, >= 0")
    sample = data[: 100_000]
    if np.all(sample == np.round(sample)) and sample.max() > COUNTS_LOOKING_MAX:
        raise GearsDataError(
            f"{path}: X looks like raw counts (integer values up to {sample.max():g}); a GEARS directory holds "
            "log-normalised X (normalize_total 1e4 + log1p). Build one from counts with data_tools/h5ad_to_gears.py")


def check_conditions(conditions: np.ndarray, gene_names: np.ndarray, path: Path) -> None:
    names = set(map(str, gene_names))
    for cond in np.unique(conditions):
        try:
            genes = parse_condition(cond)
        except ValueError as err:
            raise GearsDataError(f"{path}: obs['condition']: {err}") from None
        missing = [g for g in genes if g not in names]
        if missing:
            n = int((conditions == cond).sum())
            raise GearsDataError(f"{path}: condition {cond!r} ({n} cells) names gene(s) {missing} that are not in "
                                 "var['gene_name']: a perturbed gene must be a measured gene")
    if CTRL not in set(conditions):
        raise GearsDataError(f"{path}: no control cells (obs['condition'] == 'ctrl'): the model's inputs and "
                             "every delta metric need them")


def _condition_names(obs, conditions: np.ndarray, cell_types: np.ndarray, path: Path) -> dict[str, str]:
    if "condition_name" in obs:
        names = _as_str_array(obs["condition_name"].values)
    else:
        names = np.asarray([condition_name(t, c) for t, c in zip(cell_types, conditions)], dtype=object)
    out: dict[str, str] = {}
    for cond, name in zip(conditions, names):
        if out.setdefault(cond, name) != name:
            raise GearsDataError(f"{path}: condition {cond!r} has several condition_name values ({out[cond]!r}, "
                                 f"{name!r}): one cell type per dataset is supported")
    return out


def _uns_gene_lists(uns, key: str, condition_names: dict[str, str], path: Path) -> dict[str, np.ndarray]:
    table = uns[key]
    out = {str(k): np.asarray([str(g) for g in np.asarray(v).ravel()], dtype=object) for k, v in table.items()}
    missing = sorted(c for c, n in condition_names.items() if c != CTRL and n not in out)
    if missing:
        raise GearsDataError(f"{path}: uns['{key}'] has no entry for condition(s) {missing[:5]} (keys are "
                             f"condition_name values such as {condition_names[missing[0]]!r}); rebuild the DE genes "
                             "with data_tools/h5ad_to_gears.py")
    return out


def load_gears_dir(directory: str | Path) -> GearsData:
    """Read and validate `directory/perturb_processed.h5ad` (or an .h5ad path given directly)."""
    import anndata as ad

    directory = Path(directory)
    path = directory if directory.suffix == ".h5ad" else directory / GEARS_FILE
    if not path.is_file():
        raise GearsDataError(f"{path}: not found (a GEARS data directory holds {GEARS_FILE})")
    adata = ad.read_h5ad(path)
    missing_obs = [k for k in REQUIRED_OBS if k not in adata.obs]
    if missing_obs:
        raise GearsDataError(f"{path}: obs lacks column(s) {missing_obs} (has {list(adata.obs.columns)})")
    if "gene_name" not in adata.var:
        raise GearsDataError(f"{path}: var lacks the column 'gene_name' (the symbols conditions name)")
    missing_uns = [k for k in REQUIRED_UNS if k not in adata.uns]
    if missing_uns:
        raise GearsDataError(f"{path}: uns lacks {missing_uns}; rebuild with data_tools/h5ad_to_gears.py")
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    _check_values_log_normalised(X, path)
    conditions = _as_str_array(adata.obs["condition"].values)
    cell_types = _as_str_array(adata.obs["cell_type"].values)
    gene_names = _as_str_array(adata.var["gene_name"].values)
    check_conditions(conditions, gene_names, path)
    names = _condition_names(adata.obs, conditions, cell_types, path)
    return GearsData(path=path, X=X, conditions=conditions, cell_types=cell_types,
                     gene_ids=_as_str_array(adata.var.index.values), gene_names=gene_names, condition_names=names,
                     de_genes=_uns_gene_lists(adata.uns, DE_KEY, names, path),
                     non_dropout_de=_uns_gene_lists(adata.uns, NON_DROPOUT_KEY, names, path))
