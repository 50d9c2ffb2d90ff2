"""A local TileDB-SOMA store shaped like the CELLxGENE Census, with scRNA-seq-like counts.

Why simulate: the pipeline must run end to end (and in CI) without the hosted Census. The store
has `census_data/homo_sapiens` (measurement RNA, layer X["raw"], Census obs/var columns) and
`census_info/{summary,datasets}`, so `cellxgene_census.open_soma(uri=DIR)` opens it.

Biology, deliberately simple but with the structure that matters to a model:
- genes: a heavy-tailed baseline, tissue programs and cell-type marker programs (log-fold boosts);
- datasets (one tissue, assay, suspension each) and donors add per-gene batch shifts;
- library sizes lognormal (~10x between the 2.5% and 97.5% quantiles);
- counts negative binomial with shape 1 (geometric): P(x > 0) = mu / (1 + mu) and x | x > 0 is
  1 + Geometric, so only the non-zero entries need per-entry draws (fast, >90% zeros);
- a few percent of cells are duplicates (`is_primary_data == False`) of a primary cell.
Everything is a pure function of (seed, cell block): deterministic, and memory flat in N.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# tissue_general -> (tissue names, cell types); kidney first: it is the default shard filter.
TISSUES = {
    "kidney": (["kidney", "cortex of kidney", "renal medulla"],
               ["kidney proximal convoluted tubule epithelial cell", "kidney loop of Henle thick ascending limb epithelial cell",
                "kidney collecting duct principal cell", "kidney distal convoluted tubule epithelial cell", "podocyte",
                "endothelial cell", "T cell", "macrophage"]),
    "blood": (["blood", "peripheral blood"],
              ["CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell", "B cell", "CD14-positive monocyte",
               "natural killer cell", "platelet"]),
    "lung": (["lung", "lung parenchyma"],
             ["type II pneumocyte", "alveolar macrophage", "endothelial cell", "fibroblast", "T cell", "ciliated cell"]),
    "liver": (["liver"], ["hepatocyte", "Kupffer cell", "endothelial cell", "T cell", "cholangiocyte"]),
    "brain": (["cerebral cortex"], ["neuron", "astrocyte", "oligodendrocyte", "microglial cell"]),
}
# (tissue_general, assay, suspension, disease, relative weight)
DATASETS = [
    ("kidney", "10x 3' v3", "cell", "normal", 3.0), ("kidney", "10x 3' v2", "cell", "normal", 2.0),
    ("kidney", "10x 3' v3", "nucleus", "chronic kidney disease", 2.0), ("kidney", "10x 5' v1", "cell", "normal", 1.0),
    ("blood", "10x 3' v3", "cell", "normal", 2.5), ("blood", "10x 3' v2", "cell", "COVID-19", 1.5),
    ("blood", "10x 5' v1", "cell", "normal", 1.0), ("lung", "10x 3' v3", "cell", "normal", 1.5),
    ("lung", "10x 3' v2", "nucleus", "COVID-19", 1.0), ("liver", "10x 3' v3", "cell", "normal", 1.0),
    ("liver", "10x 3' v2", "nucleus", "normal", 0.8), ("brain", "10x 3' v3", "nucleus", "normal", 1.2),
]
ASSAY_LIBRARY = {"10x 3' v3": 3000.0, "10x 3' v2": 1800.0, "10x 5' v1": 2200.0}
OBS_STRING_COLUMNS = ("dataset_id", "donor_id", "assay", "cell_type", "tissue", "tissue_general", "disease",
                      "suspension_type")
BLOCK_CELLS = 2048  # sampling unit: results depend on (seed, block index) only; one X row tile
COMPLETE_MARKER = "simulation.json"
LAYOUT_VERSION = 2  # 2: Census X schema, datasets as contiguous joinid ranges (1: runs of 64 cells)
# The hosted Census' X layer schema (cellxgene-census builder, CENSUS_DEFAULT_X_LAYERS_PLATFORM_CONFIG):
# 2048 x 2048 space tiles, 2^16 entries per data tile, zstd-9 (byte-shuffled genes and values),
# duplicates allowed. Readers are timed against this layout, so it must be the real one.
X_TILE = BLOCK_CELLS  # 2048, the Census tile extent
CENSUS_X_PLATFORM_CONFIG = {"tiledb": {"create": {
    "capacity": 2 ** 16,
    "dims": {"soma_dim_0": {"tile": X_TILE, "filters": [{"_type": "ZstdFilter", "level": 9}]},
             "soma_dim_1": {"tile": X_TILE, "filters": ["ByteShuffleFilter", {"_type": "ZstdFilter", "level": 9}]}},
    "attrs": {"soma_data": {"filters": ["ByteShuffleFilter", {"_type": "ZstdFilter", "level": 9}]}},
    "cell_order": "row-major", "tile_order": "row-major", "allows_duplicates": True}}}


@dataclass
class SimulationConfig:
    cells: int = 20_000
    genes: int = 10_000
    seed: int = 0
    duplicate_fraction: float = 0.03
    library_sd: float = 0.6  # log-scale sd: exp(2 * 1.96 * 0.6) ~ 10x library range
    write_blocks: int = 8  # blocks per TileDB write (fewer fragments)

    def validate(self) -> None:
        if self.cells < 1:
            raise ValueError(f"cells must be >= 1, got {self.cells}")
        if self.genes < 500:
            raise ValueError(f"genes must be >= 500 (marker programs need room), got {self.genes}")
        if not 0 <= self.duplicate_fraction < 0.5:
            raise ValueError(f"duplicate_fraction must be in [0, 0.5), got {self.duplicate_fraction}")
        if self.library_sd <= 0:
            raise ValueError(f"library_sd must be > 0, got {self.library_sd}")
        if self.write_blocks < 1:
            raise ValueError(f"write_blocks must be >= 1, got {self.write_blocks}")


class CensusWorld:
    """The fixed part of the simulation (genes, programs, datasets, donors): a function of the seed."""

    def __init__(self, cfg: SimulationConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        g = cfg.genes
        self.feature_ids = [f"ENSG{(i * 7 + 3):011d}" for i in range(g)]
        self.feature_names = [f"SIM{i:05d}" for i in range(g)]
        base = rng.normal(0.0, 2.0, size=g)
        self.cell_types = sorted({ct for _, (_, cts) in TISSUES.items() for ct in cts})
        type_prog = np.zeros((len(self.cell_types), g))
        for t in range(len(self.cell_types)):
            markers = rng.choice(g, size=150, replace=False)
            type_prog[t, markers] = rng.uniform(1.5, 3.5, size=150)
        tissue_prog = {}
        for tg in TISSUES:
            prog = np.zeros(g)
            prog[rng.choice(g, size=300, replace=False)] = rng.uniform(0.5, 1.5, size=300)
            tissue_prog[tg] = prog
        self.datasets = []
        for d, (tg, assay, susp, disease, weight) in enumerate(DATASETS):
            tissues, types = TISSUES[tg]
            n_donors = int(rng.integers(2, 6))
            self.datasets.append({
                "dataset_id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                "tissue_general": tg, "tissue": tissues[d % len(tissues)], "assay": assay,
                "suspension_type": susp, "disease": disease, "weight": weight,
                "donors": [f"donor-{d:02d}-{k}" for k in range(n_donors)],
                "types": [self.cell_types.index(t) for t in types],
                "composition": rng.dirichlet(np.full(len(types), 2.0)),
                "library": ASSAY_LIBRARY[assay] * (0.6 if susp == "nucleus" else 1.0),
                "shift": rng.normal(0.0, 0.25, size=g),
                "donor_shift": rng.normal(0.0, 0.1, size=(n_donors, g)),
            })
        self.dup_dataset_id = {tg: str(uuid.UUID(bytes=rng.bytes(16), version=4)) for tg in TISSUES}
        self._base, self._type_prog, self._tissue_prog = base, type_prog, tissue_prog
        # The Census appends dataset after dataset, so each dataset is one contiguous joinid range
        # (and a tissue filter selects a few long runs). Sizes follow the weights; order is seeded.
        order = np.random.default_rng([cfg.seed, 2]).permutation(len(self.datasets))
        weights = np.array([self.datasets[d]["weight"] for d in order])
        self.dataset_order = order
        self.dataset_ends = np.round(np.cumsum(weights) / weights.sum() * cfg.cells).astype(np.int64)
        self._profiles: dict[tuple[int, int, int], np.ndarray] = {}

    def profile(self, d: int, donor: int, t: int) -> np.ndarray:
        """Expected expression proportions (float32, sums to 1) of cell type t, dataset d, donor."""
        key = (d, donor, t)
        if key not in self._profiles:
            ds = self.datasets[d]
            logits = (self._base + self._tissue_prog[ds["tissue_general"]] + self._type_prog[t]
                      + ds["shift"] + ds["donor_shift"][donor])
            p = np.exp(logits - logits.max())
            self._profiles[key] = (p / p.sum()).astype(np.float32)
        return self._profiles[key]


def simulate_block(world: CensusWorld, block: int, n_cells: int):
    """Cells of one block: (obs columns dict, CSR indptr, gene indices, float32 counts)."""
    cfg = world.cfg
    rng = np.random.default_rng([cfg.seed, 1, block])
    positions = block * BLOCK_CELLS + np.arange(n_cells)
    ds_idx = world.dataset_order[np.searchsorted(world.dataset_ends, positions, side="right")]
    n_donors = np.array([len(d["donors"]) for d in world.datasets])
    donor_idx = np.floor(rng.random(n_cells) * n_donors[ds_idx]).astype(np.int64)
    u_type = rng.random(n_cells)
    type_idx = np.zeros(n_cells, dtype=np.int64)
    for d, ds in enumerate(world.datasets):
        sel = ds_idx == d
        local = np.minimum(np.searchsorted(np.cumsum(ds["composition"]), u_type[sel], side="right"), len(ds["types"]) - 1)
        type_idx[sel] = np.asarray(ds["types"])[local]
    library = np.array([d["library"] for d in world.datasets])[ds_idx] * np.exp(rng.normal(0, cfg.library_sd, n_cells))
    profiles = np.stack([world.profile(d, k, t) for d, k, t in zip(ds_idx, donor_idx, type_idx)])
    mu = profiles * library.astype(np.float32)[:, None]
    u = rng.random(mu.shape, dtype=np.float32)
    nonzero = mu * (1 - u) > u  # u < mu / (1 + mu)
    flat = np.flatnonzero(nonzero)
    cols = flat % mu.shape[1]
    mu_nz = mu.ravel()[flat].astype(np.float64)
    counts = rng.geometric(1.0 / (1.0 + mu_nz)).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(nonzero.sum(1))]).astype(np.int64)

    # Duplicates: copy a primary cell of this block (expression and biology), as a second
    # dataset publishing the same cells would; only primary copies should be trained on.
    is_primary = np.ones(n_cells, dtype=bool)
    n_dup = int(round(cfg.duplicate_fraction * n_cells)) if n_cells > 1 else 0
    if n_dup:
        dup = np.sort(rng.choice(np.arange(1, n_cells), size=n_dup, replace=False))
        is_primary[dup] = False
        src = np.array([rng.integers(i) for i in dup])
        src = np.array([s if is_primary[s] else 0 for s in src])
        lengths = np.diff(indptr)
        row_src = np.arange(n_cells)
        row_src[dup] = src
        pieces = [(indptr[r], indptr[r + 1]) for r in row_src]
        cols = np.concatenate([cols[a:b] for a, b in pieces]) if len(cols) else cols
        counts = np.concatenate([counts[a:b] for a, b in pieces]) if len(counts) else counts
        indptr = np.concatenate([[0], np.cumsum(lengths[row_src])]).astype(np.int64)
        ds_idx, donor_idx, type_idx = ds_idx[row_src], donor_idx[row_src], type_idx[row_src]

    def column(name):
        return np.array([d[name] for d in world.datasets], dtype=object)[ds_idx]

    obs = {col: column(col) for col in ("assay", "tissue", "tissue_general", "disease", "suspension_type")}
    obs["dataset_id"] = np.where(is_primary, column("dataset_id"),
                                 np.array([world.dup_dataset_id[t] for t in obs["tissue_general"]], dtype=object))
    obs["donor_id"] = np.array([world.datasets[d]["donors"][k] for d, k in zip(ds_idx, donor_idx)], dtype=object)
    obs["cell_type"] = np.array(world.cell_types, dtype=object)[type_idx]
    obs["is_primary_data"] = is_primary
    return obs, indptr, cols.astype(np.int64), counts


def _string_table(columns: dict, joinids: np.ndarray):
    import pyarrow as pa

    data = {"soma_joinid": pa.array(joinids, pa.int64())}
    for col in OBS_STRING_COLUMNS:
        data[col] = pa.array(columns[col], pa.large_string())
    data["is_primary_data"] = pa.array(columns["is_primary_data"], pa.bool_())
    return pa.table(data)


def _marker(cfg: SimulationConfig) -> dict:
    return {**asdict(cfg), "layout_version": LAYOUT_VERSION}


def write_store(out: str | os.PathLike, cfg: SimulationConfig, progress: bool = True) -> Path:
    """Simulate and write the store; atomic (built beside `out`, then renamed) and idempotent."""
    import pyarrow as pa
    import tiledbsoma as soma
    from tqdm import tqdm

    cfg.validate()
    out = Path(out).absolute()
    marker = out / COMPLETE_MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if done != _marker(cfg):
            raise ValueError(f"{out} already holds a simulated store with different settings {done}; "
                             f"choose another --out or delete it")
        return out
    if out.exists():
        raise ValueError(f"{out} exists but is not a finished simulated store; delete it first")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    world = CensusWorld(cfg)
    obs_schema = _string_table({c: [] for c in OBS_STRING_COLUMNS} | {"is_primary_data": []},
                               np.zeros(0, np.int64)).schema
    try:
        with soma.Collection.create(str(tmp)) as top:
            data = top.add_new_collection("census_data")
            exp = data.add_new_collection("homo_sapiens", soma.Experiment)
            obs_df = exp.add_new_dataframe("obs", schema=obs_schema, domain=[(0, cfg.cells - 1)])
            ms = exp.add_new_collection("ms")
            rna = ms.add_new_collection("RNA", soma.Measurement)
            var_schema = pa.schema([("soma_joinid", pa.int64()), ("feature_id", pa.large_string()),
                                    ("feature_name", pa.large_string()), ("feature_length", pa.int64())])
            var = rna.add_new_dataframe("var", schema=var_schema, domain=[(0, cfg.genes - 1)])
            var.write(pa.table({"soma_joinid": pa.array(np.arange(cfg.genes), pa.int64()),
                                "feature_id": pa.array(world.feature_ids, pa.large_string()),
                                "feature_name": pa.array(world.feature_names, pa.large_string()),
                                "feature_length": pa.array(np.full(cfg.genes, 1500), pa.int64())}))
            xcoll = rna.add_new_collection("X")
            x_raw = xcoll.add_new_sparse_ndarray("raw", type=pa.float32(), shape=(cfg.cells, cfg.genes),
                                                 platform_config=CENSUS_X_PLATFORM_CONFIG)
            n_blocks = -(-cfg.cells // BLOCK_CELLS)
            pending = []
            for b in tqdm(range(n_blocks), desc="simulate cells", unit="block",
                          disable=not progress or not sys.stderr.isatty()):
                start = b * BLOCK_CELLS
                n = min(BLOCK_CELLS, cfg.cells - start)
                obs, indptr, cols, counts = simulate_block(world, b, n)
                pending.append((start, obs, indptr, cols, counts))
                if len(pending) == cfg.write_blocks or b == n_blocks - 1:
                    _flush(pending, obs_df, x_raw)
                    pending = []
            info = top.add_new_collection("census_info")
            _write_info(info, cfg, world)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(_marker(cfg), sort_keys=True))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _flush(pending, obs_df, x_raw) -> None:
    import pyarrow as pa
    import tiledbsoma as soma

    obs_tables, dim0, dim1, data = [], [], [], []
    for start, obs, indptr, cols, counts in pending:
        n = len(indptr) - 1
        obs_tables.append(_string_table(obs, np.arange(start, start + n, dtype=np.int64)))
        rows = start + np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
        # TileDB's global order: row tiles (a block is one, BLOCK_CELLS == X_TILE), then gene tiles,
        # then row-major inside a tile. Entries arrive row-major, so a stable sort by gene tile
        # gives that order and the write can skip TileDB's own (much slower) sort.
        order = np.argsort(cols // X_TILE, kind="stable")
        dim0.append(rows[order])
        dim1.append(cols[order])
        data.append(counts[order])
    obs_df.write(pa.concat_tables(obs_tables))
    x_raw.write(pa.table({"soma_dim_0": pa.array(np.concatenate(dim0)), "soma_dim_1": pa.array(np.concatenate(dim1)),
                          "soma_data": pa.array(np.concatenate(data))}),
                platform_config=soma.TileDBWriteOptions(sort_coords=False))


def _write_info(info, cfg: SimulationConfig, world: CensusWorld) -> None:
    import pyarrow as pa

    rows = [("census_schema_version", "2.0.1"), ("census_build_date", "simulated"),
            ("dataset_schema_version", "5.0.0"), ("total_cell_count", str(cfg.cells)),
            ("simulation_seed", str(cfg.seed))]
    summary = info.add_new_dataframe("summary", schema=pa.schema([("soma_joinid", pa.int64()), ("label", pa.large_string()),
                                                                  ("value", pa.large_string())]),
                                     domain=[(0, len(rows) - 1)])
    summary.write(pa.table({"soma_joinid": pa.array(np.arange(len(rows)), pa.int64()),
                            "label": pa.array([r[0] for r in rows], pa.large_string()),
                            "value": pa.array([r[1] for r in rows], pa.large_string())}))
    ids = [d["dataset_id"] for d in world.datasets] + list(world.dup_dataset_id.values())
    titles = [f"simulated {d['tissue_general']} ({d['assay']}, {d['suspension_type']})" for d in world.datasets] + \
             [f"simulated {tg} atlas (duplicates)" for tg in world.dup_dataset_id]
    datasets = info.add_new_dataframe("datasets", schema=pa.schema([("soma_joinid", pa.int64()),
                                                                    ("dataset_id", pa.large_string()),
                                                                    ("dataset_title", pa.large_string())]),
                                      domain=[(0, len(ids) - 1)])
    datasets.write(pa.table({"soma_joinid": pa.array(np.arange(len(ids)), pa.int64()),
                             "dataset_id": pa.array(ids, pa.large_string()),
                             "dataset_title": pa.array(titles, pa.large_string())}))
