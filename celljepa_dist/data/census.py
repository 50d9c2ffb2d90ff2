"""Cell sources for shard building: a SOMA/Census query, an AnnData file, or several AnnData files
(H5adFilesSource: one union of genes, cells file after file) -> CSR chunks + obs.

All sources expose the same small interface (`CellSource`): the dataset's genes (feature_id,
feature_name), the filtered cells' joinids in ascending order with their metadata, and
`read_rows(joinids) -> (indptr, gene_index, values)` in that order, never the whole matrix.
The hosted Census (`census_version`) and a local store (`uri`) go through the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .h5ad import check_h5ad_path
from .kernels import OK, coo_to_csr

DEFAULT_OBS_FILTER = "tissue_general == 'kidney' and is_primary_data == True"
META_COLUMNS = ("cell_type", "dataset_id", "donor_id", "assay")
# Rows closer than this are read as one slice (TileDB slices are ~10x faster than point lists).
MAX_READ_GAP = 32
# TileDB settings for every read (docs/data.md has the measurements):
# - no malloc_trim after each query: TileDB calls it by default when a query is destroyed, which
#   hands every free heap page back to the kernel, so the next query faults (and zeroes) all its
#   buffers again; on the development VM that was 60% of the read's CPU time.
READ_TILEDB_CONFIG = {"sm.mem.malloc_trim": "false"}
# ... and for a local store (cellxgene_census' own defaults are tuned for S3):
# - read buffers of 16 MiB, not 1 GiB: a 1 GiB buffer is a fresh mmap per query whose touched
#   pages all fault; 16 MiB buffers come from the reused heap;
# - no TileDB thread pool: parallelism comes from --num-jobs processes and the build's own
#   read/process/write threads; TileDB's pool only added hand-off cost at this query size.
# --tiledb-config overrides any of them.
LOCAL_TILEDB_CONFIG = {**READ_TILEDB_CONFIG, "soma.init_buffer_bytes": 16 << 20, "sm.compute_concurrency_level": 1,
                       "sm.io_concurrency_level": 1}


@dataclass
class CensusSourceConfig:
    uri: str | None = None
    census_version: str | None = None
    organism: str = "homo_sapiens"
    obs_filter: str = DEFAULT_OBS_FILTER
    layer: str = "raw"
    # TileDB settings on top of the defaults (cellxgene_census', plus LOCAL_TILEDB_CONFIG for a
    # local store), e.g. {"sm.compute_concurrency_level": 1}.
    tiledb_config: dict | None = None

    def validate(self) -> None:
        if (self.uri is None) == (self.census_version is None):
            raise ValueError("census source: give exactly one of uri (a local store) and census_version")
        if self.census_version in ("stable", "latest"):
            raise ValueError(f"census_version: pin a dated release (e.g. 2023-05-15), not {self.census_version!r}")
        if not self.organism:
            raise ValueError("organism must not be empty")

    def describe(self) -> dict:
        where = {"uri": str(self.uri)} if self.uri is not None else {"census_version": self.census_version}
        return {"kind": "census", **where, "organism": self.organism, "obs_filter": self.obs_filter,
                "layer": self.layer}


def _organism_key(organism: str) -> str:
    return organism.strip().lower().replace(" ", "_")


def runs_to_ranges(joinids: np.ndarray, max_gap: int = MAX_READ_GAP) -> list[tuple[int, int]]:
    """Inclusive (lo, hi) ranges covering sorted joinids, merging gaps up to max_gap."""
    if len(joinids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(joinids) > max_gap)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(joinids) - 1]])
    return [(int(joinids[a]), int(joinids[b])) for a, b in zip(starts, ends)]


class DuplicateEntryError(ValueError):
    def __init__(self, joinid: int, gene_index: int):
        super().__init__(f"cell soma_joinid={joinid} has more than one X entry for gene #{gene_index}")
        self.joinid, self.gene_index = joinid, gene_index


def coo_rows_to_csr(joinids: np.ndarray, dim0: np.ndarray, dim1: np.ndarray, data: np.ndarray):
    """Keep entries whose row is in `joinids` (sorted, unique) and return CSR (indptr, genes,
    values) in joinids order, genes ascending within each row; entries may come in any order.

    On the Census layout an unordered read returns each 2048-row x 2048-gene tile row-major, tile
    after tile, so a row's genes arrive in up to 5 ascending pieces: kernels.coo_to_csr scatters
    entries stably into their rows (through a lookup table from joinid to row when the chunk is
    dense enough) and sorts only a row whose genes do not ascend. Raises DuplicateEntryError for a
    repeated (cell, gene) entry (the Census schema allows duplicate coordinates; a cell must not)."""
    joinids = np.ascontiguousarray(joinids, dtype=np.int64)
    if len(joinids) and joinids[-1] - joinids[0] < 64 * len(joinids):
        position_of = np.full(int(joinids[-1] - joinids[0] + 1), -1, dtype=np.int32)
        position_of[joinids - joinids[0]] = np.arange(len(joinids), dtype=np.int32)
    else:  # sparse chunk: binary search per entry instead of a huge table
        position_of = np.zeros(0, dtype=np.int32)
    indptr, genes, values, code, joinid, gene = coo_to_csr(
        joinids, position_of, np.ascontiguousarray(dim0, dtype=np.int64), np.ascontiguousarray(dim1, dtype=np.int64),
        np.ascontiguousarray(data, dtype=np.float32))
    if code != OK:
        raise DuplicateEntryError(int(joinid), int(gene))
    return indptr, genes, values


def _open_census(cfg: CensusSourceConfig, where: str):
    """cellxgene_census.open_soma; a path that is no SOMA store (tiledbsoma's DoesNotExistError,
    which names no path) or a store TileDB cannot read is a ValueError naming `where`."""
    import cellxgene_census
    import tiledbsoma as soma

    try:
        if cfg.uri is not None:
            return cellxgene_census.open_soma(uri=str(cfg.uri),
                                              tiledb_config={**LOCAL_TILEDB_CONFIG, **(cfg.tiledb_config or {})})
        return cellxgene_census.open_soma(census_version=cfg.census_version,
                                          tiledb_config={**READ_TILEDB_CONFIG, **(cfg.tiledb_config or {})})
    except soma.DoesNotExistError:
        raise ValueError(f"{where}: not a Census/SOMA store (no SOMA collection there)") from None
    except (soma.SOMAError, OSError) as e:
        raise ValueError(f"{where}: cannot open as a Census/SOMA store ({type(e).__name__}: {e})") from None


class CensusSource:
    """A Census-shaped SOMA experiment, local or hosted. Use as a context manager."""

    def __init__(self, cfg: CensusSourceConfig):
        cfg.validate()
        self.cfg = cfg
        where = cfg.uri or f"Census {cfg.census_version}"
        if cfg.uri is not None and "://" not in str(cfg.uri) and not Path(cfg.uri).exists():
            raise FileNotFoundError(f"census store not found: {cfg.uri}")
        self.census = _open_census(cfg, where)
        try:
            data = self.census["census_data"]
        except KeyError:
            self.close()
            raise ValueError(f"{where}: no census_data collection (not a Census-shaped store)") from None
        key = _organism_key(cfg.organism)
        if key not in data:
            self.close()
            raise ValueError(f"{where}: organism {cfg.organism!r} not found; available: {sorted(data.keys())}")
        self.exp = data[key]
        self.where = where
        rna = self.exp.ms["RNA"]
        if cfg.layer not in rna.X:
            self.close()
            raise ValueError(f"{where}: layer X[{cfg.layer!r}] not found; available: {sorted(rna.X.keys())}")
        self.X = rna.X[cfg.layer]
        var = rna.var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat().to_pandas()
        var = var.sort_values("soma_joinid")
        if not np.array_equal(var["soma_joinid"].to_numpy(), np.arange(len(var))):
            self.close()
            raise ValueError(f"{where}: var soma_joinids are not 0..{len(var) - 1}")
        self.feature_ids = var["feature_id"].astype(str).tolist()
        self.feature_names = var["feature_name"].astype(str).tolist()
        self.layer_is_raw = cfg.layer == "raw"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.census.close()

    def cells(self) -> pd.DataFrame:
        """Filtered cells sorted by soma_joinid: columns soma_joinid + META_COLUMNS."""
        import tiledbsoma as soma

        try:
            tables = self.exp.obs.read(value_filter=self.cfg.obs_filter,
                                       column_names=["soma_joinid", *META_COLUMNS]).concat()
        except (soma.SOMAError, ValueError) as e:
            raise ValueError(f"{self.where}: obs filter {self.cfg.obs_filter!r} failed: {e}") from None
        obs = tables.to_pandas().sort_values("soma_joinid", kind="stable").reset_index(drop=True)
        if len(obs) == 0:
            raise ValueError(f"{self.where}: obs filter {self.cfg.obs_filter!r} matches no cell")
        for col in META_COLUMNS:
            obs[col] = obs[col].astype(str)
        return obs

    def read_rows(self, joinids: np.ndarray):
        """CSR (indptr, var index, float32 values) of the given sorted joinids, in that order."""
        dim0, dim1, data = [], [], []
        for lo, hi in runs_to_ranges(joinids):
            for t in self.X.read(coords=(slice(lo, hi),)).tables():
                dim0.append(t.column("soma_dim_0").to_numpy())
                dim1.append(t.column("soma_dim_1").to_numpy())
                data.append(t.column("soma_data").to_numpy())
        if not dim0:
            return np.zeros(len(joinids) + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)

        def joined(parts):  # zero-copy views of Arrow's buffers when TileDB answered in one table
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        try:
            return coo_rows_to_csr(joinids, joined(dim0), joined(dim1), joined(data).astype(np.float32, copy=False))
        except DuplicateEntryError as e:
            raise ValueError(f"{self.where}: cell soma_joinid={e.joinid} has more than one X[{self.cfg.layer!r}] "
                             f"entry for gene {self.feature_ids[e.gene_index]}") from None


# A label the obs column does not hold: NaN/None/pd.NA, or the text such a value becomes through
# astype(str) or a categorical written from it (compared stripped and lower-cased).
MISSING_LABEL_TEXT = frozenset({"", "nan", "none", "<na>"})


def label_texts(column: pd.Series) -> list[str | None]:
    """Each cell's label as text, None where it is missing (MISSING_LABEL_TEXT): a missing label is
    unknown (-1), never a class of its own."""
    return [None if missing or str(v).strip().lower() in MISSING_LABEL_TEXT else str(v)
            for v, missing in zip(column.tolist(), column.isna().tolist())]


def meta_texts(column: pd.Series) -> list[str]:
    """A metadata column as text, '' where missing (as for a file without the column)."""
    return ["" if v is None else v for v in label_texts(column)]


def label_codes(labels: list[str | None], names: list[str]) -> np.ndarray:
    """Index of each label in `names`; -1 for a missing one."""
    index = {name: i for i, name in enumerate(names)}
    return np.array([-1 if v is None else index[v] for v in labels], dtype=np.int64)


@dataclass
class H5adSourceConfig:
    path: str
    layer: str | None = None  # None: X
    label_key: str | None = None
    raw_check: bool = True  # values must be integer counts (binning assumes raw counts)

    def validate(self) -> None:
        check_h5ad_path(self.path)

    def describe(self) -> dict:
        return {"kind": "h5ad", "path": str(Path(self.path).name), "layer": self.layer or "X",
                "label_key": self.label_key}


class _InMemoryRows:
    """The CellSource reads of a source held in memory: `self.matrix` (sorted CSR over all its
    cells, row = joinid), `self.obs`, `self.where`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def cells(self) -> pd.DataFrame:
        if len(self.obs) == 0:
            raise ValueError(f"{self.where}: no cells")
        return self.obs

    def read_rows(self, joinids: np.ndarray):
        sub = self.matrix[joinids]
        return sub.indptr.astype(np.int64), sub.indices.astype(np.int64), sub.data.astype(np.float32, copy=False)


class H5adSource(_InMemoryRows):
    """An AnnData file as a cell source; joinids are row indices, labels from `label_key`."""

    def __init__(self, cfg: H5adSourceConfig):
        import scipy.sparse as sp

        from .h5ad import layer_matrix, layer_var, read_h5ad

        cfg.validate()
        self.cfg = cfg
        self.where = str(cfg.path)
        adata = read_h5ad(cfg.path)
        var = layer_var(adata, cfg.layer, str(cfg.path))
        self.matrix = sp.csr_matrix(layer_matrix(adata, cfg.layer, str(cfg.path)), dtype=np.float32)
        self.matrix.sort_indices()
        id_col = next((c for c in ("feature_id", "gene_ids", "gene_id", "ensembl_id") if c in var.columns), None)
        name_col = next((c for c in ("feature_name", "gene_name", "gene_symbols", "gene_symbol") if c in var.columns), None)
        names = var[name_col].astype(str).tolist() if name_col else [str(x) for x in var.index]
        self.feature_ids = var[id_col].astype(str).tolist() if id_col else [str(x) for x in var.index]
        self.feature_names = names
        obs = pd.DataFrame({"soma_joinid": np.arange(adata.n_obs, dtype=np.int64)})
        for col in META_COLUMNS:
            obs[col] = meta_texts(adata.obs[col]) if col in adata.obs.columns else ""
        self.labels: list[str] | None = None
        self.cells_without_label = 0
        if cfg.label_key is not None:
            if cfg.label_key not in adata.obs.columns:
                raise ValueError(f"{cfg.path}: label key {cfg.label_key!r} not in obs; columns: {list(adata.obs.columns)}")
            values = label_texts(adata.obs[cfg.label_key])
            self.labels = sorted({v for v in values if v is not None})
            self.cells_without_label = sum(v is None for v in values)
            obs["label"] = label_codes(values, self.labels)
            if "cell_type" not in adata.obs.columns:
                obs["cell_type"] = ["" if v is None else v for v in values]
        self.obs = obs
        self.layer_is_raw = cfg.raw_check


# --- several AnnData files as one source ------------------------------------------------------
@dataclass(frozen=True)
class PerFile:
    """An option given once for every file (`VALUE`) and/or per file (`FILE_STEM=VALUE`, which
    overrides the default for that file). `STEM=` (empty value) sets that file's value to ''."""
    default: str | None = None
    by_stem: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, values: Sequence[str] | None, option: str) -> "PerFile":
        default, by_stem = None, {}
        for value in values or ():
            stem, sep, rest = value.partition("=")
            if not sep:
                if default is not None:
                    raise ValueError(f"{option}: two values for all files ({default!r}, {value!r}); "
                                     f"use FILE_STEM=VALUE for per-file values")
                default = value
            elif not stem:
                raise ValueError(f"{option}: {value!r} has no file stem before '='")
            elif stem in by_stem:
                raise ValueError(f"{option}: file stem {stem!r} given twice")
            else:
                by_stem[stem] = rest
        return cls(default, tuple(sorted(by_stem.items())))

    @property
    def given(self) -> bool:
        return self.default is not None or bool(self.by_stem)

    def for_stem(self, stem: str) -> str | None:
        return dict(self.by_stem).get(stem, self.default)

    def unknown_stems(self, stems: Sequence[str]) -> list[str]:
        return [s for s, _ in self.by_stem if s not in stems]


@dataclass
class H5adFilesConfig:
    """Several h5ad files in the order given; a file is named by its stem (its dataset_id)."""
    paths: Sequence[str]
    layer: PerFile = PerFile()  # None or '': X
    label_key: PerFile = PerFile()  # '' for a file: it has no labels
    allow_missing_labels: bool = False  # a file without its label key gets label -1, cell_type ''
    raw_check: bool = True  # values must be integer counts ...
    non_integer_stems: tuple[str, ...] = ()  # ... except in these files
    gene_id_scheme: str = "auto"
    gene_key: PerFile = PerFile()  # var column (or 'var_names') holding the gene ids
    gene_map: str | None = None  # TSV feature_id<TAB>feature_name converting between schemes

    @property
    def stems(self) -> list[str]:
        return [Path(p).name.removesuffix(".h5ad") for p in self.paths]

    def raw_check_of(self, stem: str) -> bool:
        return self.raw_check and stem not in self.non_integer_stems

    def validate(self) -> None:
        from .gene_ids import REQUESTABLE_SCHEMES

        if not self.paths:
            raise ValueError("h5ad source: no files given")
        for path in self.paths:
            check_h5ad_path(path)
        first: dict[str, str] = {}
        for path, stem in zip(self.paths, self.stems):
            if stem in first:
                raise ValueError(f"h5ad files {first[stem]} and {path} have the same stem {stem!r} "
                                 f"(the stem is the cells' dataset_id)")
            first[stem] = str(path)
        if self.gene_id_scheme not in REQUESTABLE_SCHEMES:
            raise ValueError(f"gene-id scheme must be one of {REQUESTABLE_SCHEMES}, got {self.gene_id_scheme!r}")
        for option, per_file in (("--layer", self.layer), ("--label-key", self.label_key),
                                 ("--gene-key", self.gene_key)):
            unknown = per_file.unknown_stems(self.stems)
            if unknown:
                raise ValueError(f"{option}: no file with stem {unknown[0]!r}; stems: {self.stems}")
        unknown = [s for s in self.non_integer_stems if s not in self.stems]
        if unknown:
            raise ValueError(f"--allow-non-integer: no file with stem {unknown[0]!r}; stems: {self.stems}")
        if self.gene_map is not None and not Path(self.gene_map).is_file():
            raise FileNotFoundError(f"gene map not found: {self.gene_map}")


def _file_genes_of(adata, path: str, stem: str, cfg: H5adFilesConfig):
    """The genes indexing the columns of the file's chosen layer (adata.raw.var for --layer raw)."""
    from .gene_ids import file_genes
    from .h5ad import layer_var

    layer = cfg.layer.for_stem(stem)
    var = layer_var(adata, layer, str(path))
    if len(var) == 0:
        raise ValueError(f"{path}: no genes ({'adata.raw.var' if var is not adata.var else 'var'} is empty)")
    return file_genes(var, cfg.gene_key.for_stem(stem) or None, str(path))


def _gene_map_of(cfg: H5adFilesConfig):
    from .gene_ids import GeneMap

    return GeneMap.load(cfg.gene_map) if cfg.gene_map is not None else None


def h5ad_gene_union(cfg: H5adFilesConfig):
    """The files' genes in one scheme and their union (gene_ids.GeneUnion); reads var only."""
    from .gene_ids import resolve_union
    from .h5ad import read_h5ad

    cfg.validate()
    files = []
    for path, stem in zip(cfg.paths, cfg.stems):
        adata = read_h5ad(path, backed="r")
        try:
            files.append(_file_genes_of(adata, path, stem, cfg))
        finally:
            adata.file.close()
    return resolve_union(files, cfg.gene_id_scheme, _gene_map_of(cfg))


def _matrix_of(adata, layer: str | None, path: str):
    import scipy.sparse as sp

    from .h5ad import layer_matrix

    matrix = sp.csr_matrix(layer_matrix(adata, layer, path), dtype=np.float32)
    matrix.sort_indices()
    return matrix


def check_not_empty(matrix, path: str, layer: str | None) -> None:
    """A file must give cells: refuse one without cells, or whose every cell is all zeros (the
    build would drop them all and still report success)."""
    n = matrix.shape[0]
    if n == 0:
        raise ValueError(f"{path}: no cells (obs is empty)")
    rows = np.repeat(np.arange(n), np.diff(matrix.indptr))
    expressed = len(np.unique(rows[matrix.data != 0]))
    if expressed == 0:
        raise ValueError(f"{path}: no cells left after filtering: all {n} cells are empty "
                         f"(no non-zero value in {layer or 'X'})")


def check_values(matrix, raw: bool, path: str, stem: str, cell_names: Sequence[str], first_joinid: int,
                 gene_ids: Sequence[str]) -> None:
    """Every stored value finite and >= 0, and an integer when `raw`; the error names the file,
    the cell (obs name, row, soma_joinid) and the gene."""
    data = matrix.data
    bad = ~np.isfinite(data) | (data < 0)
    if raw:
        bad |= data != np.floor(data)
    if not bad.any():
        return
    k = int(np.argmax(bad))
    value = float(data[k])
    what = ("is not finite" if not np.isfinite(value) else "is negative (counts must be >= 0)" if value < 0 else
            f"is not an integer count (raw counts expected; pass --allow-non-integer {stem} if intended)")
    row = int(np.searchsorted(matrix.indptr, k, side="right") - 1)
    raise ValueError(f"{path}: cell {cell_names[row]!r} (row {row}, soma_joinid={first_joinid + row}), "
                     f"gene {gene_ids[matrix.indices[k]]}: value {value!r} {what}")


def _to_union_columns(matrix, columns: np.ndarray, n_union: int):
    """The file's CSR with columns renumbered into the union; genes left out (-1) are dropped."""
    import scipy.sparse as sp

    new = columns[matrix.indices]
    keep = new >= 0
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=matrix.shape[0]))])
    return sp.csr_matrix((matrix.data[keep], new[keep], indptr), shape=(matrix.shape[0], n_union))


def _raw_hint(adata, layer: str | None) -> str:
    """For a non-integer X: say so when adata.raw holds the integer counts."""
    from .h5ad import raw_holds_counts

    return "; adata.raw holds integer counts: pass --layer raw" if not layer and raw_holds_counts(adata) else ""


class H5adFilesSource(_InMemoryRows):
    """Several AnnData files as one cell source: cells of file 1, then file 2, ...; joinids are the
    global row index; dataset_id is the file stem; genes are the union (gene_ids.union_genes)."""

    def __init__(self, cfg: H5adFilesConfig):
        import scipy.sparse as sp

        from .gene_ids import resolve_union
        from .h5ad import read_h5ad, uses_raw

        cfg.validate()
        self.cfg = cfg
        self.where = "h5ad files " + ", ".join(str(p) for p in cfg.paths)
        adatas, files = [], []
        for path, stem in zip(cfg.paths, cfg.stems):
            adata = read_h5ad(path)
            adatas.append(adata)
            files.append(_file_genes_of(adata, path, stem, cfg))
        self.gene_map = _gene_map_of(cfg)
        self.genes = resolve_union(files, cfg.gene_id_scheme, self.gene_map)
        self.feature_ids = list(self.genes.feature_ids)
        self.feature_names = list(self.genes.feature_names)
        matrices, obs_parts, label_values = [], [], []
        self._file_info = []
        first_joinid = 0
        for adata, path, stem, genes, columns in zip(adatas, cfg.paths, cfg.stems, files, self.genes.columns):
            layer = cfg.layer.for_stem(stem)
            matrix = _matrix_of(adata, layer, path)
            check_not_empty(matrix, str(path), layer)
            try:
                check_values(matrix, cfg.raw_check_of(stem), str(path), stem, [str(x) for x in adata.obs_names],
                             first_joinid, genes.keys)
            except ValueError as e:
                raise ValueError(f"{e}{_raw_hint(adata, layer)}") from None
            columns = np.asarray(columns, dtype=np.int64)
            matrices.append(_to_union_columns(matrix, columns, len(self.feature_ids)))
            label_key, labels = self._labels_of(adata.obs, path, stem)
            label_values.append(labels)
            obs_parts.append(self._meta_of(adata.obs, stem, first_joinid, labels))
            info = {"path": Path(path).name, "dataset_id": stem, "cells": int(adata.n_obs),
                    "first_joinid": first_joinid, "layer": "adata.raw" if uses_raw(adata, layer) else layer or "X",
                    "label_key": label_key, "raw_check": cfg.raw_check_of(stem),
                    "genes_left_out": int((columns < 0).sum())}
            if cfg.label_key.given:  # counted, so a build says how many cells carry no label
                info["cells_without_label"] = adata.n_obs if labels is None else sum(v is None for v in labels)
            self._file_info.append(info)
            first_joinid += adata.n_obs
        self.matrix = sp.vstack(matrices, format="csr") if matrices else None
        self.obs = pd.concat(obs_parts, ignore_index=True)
        self.labels: list[str] | None = None
        if cfg.label_key.given:
            # One label index over all files: the same name in two files is the same class.
            self.labels = sorted({v for part in label_values if part is not None for v in part if v is not None})
            self.obs["label"] = np.concatenate(
                [label_codes(part, self.labels) if part is not None else np.full(n, -1, np.int64)
                 for part, n in zip(label_values, (f["cells"] for f in self._file_info))])
        self.layer_is_raw = all(cfg.raw_check_of(s) for s in cfg.stems)

    def _labels_of(self, obs: pd.DataFrame, path: str, stem: str) -> tuple[str | None, list | None]:
        """(label key used, the label per cell with None where missing) or (None, None)."""
        cfg = self.cfg
        key = cfg.label_key.for_stem(stem)
        if key is None:
            if cfg.label_key.given and not cfg.allow_missing_labels:
                raise ValueError(f"{path}: no --label-key for this file; give {stem}=KEY, {stem}= (no labels) "
                                 f"or --allow-missing-labels")
            return None, None
        if key == "":
            return None, None
        if key not in obs.columns:
            if cfg.allow_missing_labels:
                return None, None
            raise ValueError(f"{path}: label key {key!r} not in obs; columns: {list(obs.columns)} "
                             f"(give {stem}=KEY, {stem}= for no labels, or --allow-missing-labels)")
        return key, label_texts(obs[key])

    @staticmethod
    def _meta_of(obs: pd.DataFrame, stem: str, first_joinid: int, labels: list | None) -> pd.DataFrame:
        n = len(obs)
        meta = pd.DataFrame({"soma_joinid": np.arange(first_joinid, first_joinid + n, dtype=np.int64)})
        for col in META_COLUMNS:
            if col == "dataset_id":
                meta[col] = stem
            elif col in obs.columns:
                meta[col] = meta_texts(obs[col])
            elif col == "cell_type" and labels is not None:
                meta[col] = ["" if v is None else v for v in labels]
            else:
                meta[col] = ""
        return meta

    def describe(self) -> dict:
        files = [{**info, **resolved.describe()} for info, resolved in zip(self._file_info, self.genes.files)]
        return {"kind": "h5ad", "gene_id_scheme": self.genes.scheme, "gene_id_scheme_requested": self.cfg.gene_id_scheme,
                "gene_map": self.gene_map.describe() if self.gene_map else None,
                "allow_missing_labels": self.cfg.allow_missing_labels, "files": files}

