"""Cell sources for shard building: a SOMA/Census query or an AnnData file -> CSR chunks + obs.

Both sources expose the same small interface (`CellSource`): the dataset's genes (feature_id,
feature_name), the filtered cells' joinids in ascending order with their metadata, and
`read_rows(joinids) -> (indptr, gene_index, values)` in that order, never the whole matrix.
The hosted Census (`census_version`) and a local store (`uri`) go through the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

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


class CensusSource:
    """A Census-shaped SOMA experiment, local or hosted. Use as a context manager."""

    def __init__(self, cfg: CensusSourceConfig):
        import cellxgene_census

        cfg.validate()
        self.cfg = cfg
        if cfg.uri is not None:
            if "://" not in str(cfg.uri) and not Path(cfg.uri).exists():
                raise FileNotFoundError(f"census store not found: {cfg.uri}")
            self.census = cellxgene_census.open_soma(uri=str(cfg.uri),
                                                     tiledb_config={**LOCAL_TILEDB_CONFIG, **(cfg.tiledb_config or {})})
        else:
            self.census = cellxgene_census.open_soma(census_version=cfg.census_version,
                                                     tiledb_config={**READ_TILEDB_CONFIG, **(cfg.tiledb_config or {})})
        where = cfg.uri or f"Census {cfg.census_version}"
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


@dataclass
class H5adSourceConfig:
    path: str
    layer: str | None = None  # None: X
    label_key: str | None = None
    raw_check: bool = True  # values must be integer counts (binning assumes raw counts)

    def validate(self) -> None:
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"h5ad file not found: {self.path}")

    def describe(self) -> dict:
        return {"kind": "h5ad", "path": str(Path(self.path).name), "layer": self.layer or "X",
                "label_key": self.label_key}


class H5adSource:
    """An AnnData file as a cell source; joinids are row indices, labels from `label_key`."""

    def __init__(self, cfg: H5adSourceConfig):
        import anndata
        import scipy.sparse as sp

        cfg.validate()
        self.cfg = cfg
        self.where = str(cfg.path)
        adata = anndata.read_h5ad(cfg.path)
        if cfg.layer is None:
            matrix = adata.X
        elif cfg.layer in adata.layers:
            matrix = adata.layers[cfg.layer]
        else:
            raise ValueError(f"{cfg.path}: layer {cfg.layer!r} not found; layers: {sorted(adata.layers.keys())}")
        if matrix is None:
            raise ValueError(f"{cfg.path}: X is empty; pass --layer")
        self.matrix = sp.csr_matrix(matrix, dtype=np.float32)
        self.matrix.sort_indices()
        var = adata.var
        id_col = next((c for c in ("feature_id", "gene_ids", "gene_id", "ensembl_id") if c in var.columns), None)
        name_col = next((c for c in ("feature_name", "gene_name", "gene_symbols", "gene_symbol") if c in var.columns), None)
        names = var[name_col].astype(str).tolist() if name_col else [str(x) for x in var.index]
        self.feature_ids = var[id_col].astype(str).tolist() if id_col else [str(x) for x in var.index]
        self.feature_names = names
        obs = pd.DataFrame({"soma_joinid": np.arange(adata.n_obs, dtype=np.int64)})
        for col in META_COLUMNS:
            obs[col] = adata.obs[col].astype(str).to_numpy() if col in adata.obs.columns else ""
        self.labels: list[str] | None = None
        if cfg.label_key is not None:
            if cfg.label_key not in adata.obs.columns:
                raise ValueError(f"{cfg.path}: label key {cfg.label_key!r} not in obs; columns: {list(adata.obs.columns)}")
            values = adata.obs[cfg.label_key].astype(str)
            self.labels = sorted(values.unique().tolist())
            index = {name: i for i, name in enumerate(self.labels)}
            obs["label"] = values.map(index).astype(np.int64).to_numpy()
            if "cell_type" not in adata.obs.columns:
                obs["cell_type"] = values.to_numpy()
        self.obs = obs
        self.layer_is_raw = cfg.raw_check

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
