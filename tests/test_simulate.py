"""The simulated Census-shaped store: opens like the Census, deterministic, scRNA-seq-like."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from celljepa_dist.data.simulate import BLOCK_CELLS, CensusWorld, SimulationConfig, simulate_block, write_store

REPO = Path(__file__).resolve().parents[1]
OBS_COLUMNS = ["soma_joinid", "dataset_id", "donor_id", "assay", "cell_type", "tissue", "tissue_general", "disease",
               "suspension_type", "is_primary_data"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """2000 cells x the default 10k genes through the real writer, read back through cellxgene_census."""
    import cellxgene_census

    path = write_store(tmp_path_factory.mktemp("sim") / "census", SimulationConfig(cells=2000, seed=11),
                       progress=False)
    with cellxgene_census.open_soma(uri=str(path)) as census:
        exp = census["census_data"]["homo_sapiens"]
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)
        var = exp.ms["RNA"].var.read().concat().to_pandas()
        t = exp.ms["RNA"].X["raw"].read().tables().concat()
        summary = census["census_info"]["summary"].read().concat().to_pandas()
    X = np.zeros((len(obs), len(var)), np.float32)
    X[t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy()] = t["soma_data"].to_numpy()
    return path, obs, var, X, t["soma_data"].to_numpy(), summary


def test_census_layout_and_columns(sim):
    _, obs, var, X, data, summary = sim
    assert list(obs.columns) == OBS_COLUMNS
    assert var["feature_id"].str.match(r"^ENSG\d{11}$").all() and var["feature_id"].is_unique
    assert "feature_name" in var.columns
    assert data.dtype == np.float32 and (data > 0).all() and (data == np.round(data)).all()  # counts, no stored zeros
    assert "census_schema_version" in summary["label"].tolist()


def test_scrnaseq_like_statistics(sim):
    _, obs, _, X, _, _ = sim
    assert (X == 0).mean() > 0.90
    lib = X.sum(1)
    assert np.percentile(lib, 97.5) / np.percentile(lib, 2.5) > 7  # ~10x library sizes
    assert {"kidney", "blood", "lung"} <= set(obs.tissue_general)
    assert obs[obs.tissue_general == "kidney"].cell_type.nunique() >= 5
    dup = ~obs.is_primary_data
    assert 0.01 < dup.mean() < 0.06
    # every duplicate is an exact copy of a primary cell
    primary_rows = {X[i].tobytes() for i in np.flatnonzero(~dup)}
    assert all(X[i].tobytes() in primary_rows for i in np.flatnonzero(dup))


def test_counts_are_overdispersed(sim):
    _, obs, _, X, _, _ = sim
    grp = obs[obs.is_primary_data].groupby(["dataset_id", "donor_id", "cell_type"]).groups
    key = max(grp, key=lambda k: len(grp[k]))
    cells = X[np.asarray(grp[key])]
    lib = cells.sum(1, keepdims=True)
    norm = cells / lib * np.median(lib)  # remove library size, keep biological + sampling noise
    mean, var = norm.mean(0), norm.var(0)
    high = mean > 5
    assert high.sum() > 10 and np.median(var[high] / mean[high]) > 2  # Poisson would give ~1


def test_cell_types_are_separable_and_datasets_shift_expression(sim):
    _, obs, _, X, _, _ = sim
    logx = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    types = obs.cell_type.to_numpy()
    rng = np.random.default_rng(0)
    train = rng.random(len(obs)) < 0.5
    labels = sorted(set(types[train]))
    centroids = np.stack([logx[train & (types == t)].mean(0) for t in labels])
    test = ~train & np.isin(types, labels)
    dist = (centroids ** 2).sum(1)[None, :] - 2 * logx[test] @ centroids.T
    pred = np.array(labels)[np.argmin(dist, axis=1)]
    assert (pred == types[test]).mean() > 0.9
    # batch effect: the same cell type differs between datasets more than between random halves
    ct = obs[obs.is_primary_data].groupby("cell_type").dataset_id.nunique().idxmax()
    sel = (types == ct) & obs.is_primary_data.to_numpy()
    ds = obs.dataset_id.to_numpy()[sel]
    a, b = sorted(set(ds), key=lambda d: -(ds == d).sum())[:2]
    xa, xb = logx[sel][ds == a], logx[sel][ds == b]
    # Equal group sizes on both sides, so sampling noise is the same and only the shift differs;
    # over the genes the type expresses (the shift is multiplicative).
    m = min(len(xa) // 2, len(xb))
    expressed = logx[sel].mean(0) > 1
    between = np.abs(xa[:m].mean(0) - xb[:m].mean(0))[expressed].mean()
    within = np.abs(xa[:m].mean(0) - xa[m:2 * m].mean(0))[expressed].mean()
    assert between > 1.2 * within


def test_deterministic_per_seed_and_block():
    w = CensusWorld(SimulationConfig(cells=5000, genes=800, seed=4))
    a = simulate_block(w, 1, 300)
    b = simulate_block(CensusWorld(SimulationConfig(cells=5000, genes=800, seed=4)), 1, 300)
    c = simulate_block(CensusWorld(SimulationConfig(cells=5000, genes=800, seed=5)), 1, 300)
    for x, y in zip(a[1:], b[1:]):
        np.testing.assert_array_equal(x, y)
    assert {k: list(v) for k, v in a[0].items()} == {k: list(v) for k, v in b[0].items()}
    assert not np.array_equal(a[3][:100], c[3][:100])


def test_store_is_identical_for_equal_seeds(tmp_path):
    import tiledbsoma as soma

    def read(p):
        with soma.open(str(p / "census_data" / "homo_sapiens")) as e:
            t = e.ms["RNA"].X["raw"].read().tables().concat()
            return e.obs.read().concat().to_pandas(), t.to_pandas().sort_values(["soma_dim_0", "soma_dim_1"])

    cfg = SimulationConfig(cells=BLOCK_CELLS + 100, genes=600, seed=2, write_blocks=1)
    o1, x1 = read(write_store(tmp_path / "a", cfg, progress=False))
    o2, x2 = read(write_store(tmp_path / "b", cfg, progress=False))
    assert o1.equals(o2) and np.array_equal(x1.to_numpy(), x2.to_numpy()) and o1.soma_joinid.max() == BLOCK_CELLS + 99


def test_rerun_is_idempotent_and_a_different_config_is_refused(tmp_path):
    cfg = SimulationConfig(cells=100, genes=600, seed=1)
    out = write_store(tmp_path / "s", cfg, progress=False)
    stamp = (out / "simulation.json").stat().st_mtime_ns
    assert write_store(tmp_path / "s", cfg, progress=False) == out
    assert (out / "simulation.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="different settings"):
        write_store(tmp_path / "s", SimulationConfig(cells=101, genes=600, seed=1), progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directories left


@pytest.mark.parametrize("field,value", [("cells", 0), ("genes", 10), ("duplicate_fraction", 0.7), ("library_sd", 0)])
def test_config_validation_names_the_field(field, value):
    cfg = SimulationConfig()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        cfg.validate()


@pytest.mark.slow
def test_memory_is_flat_in_cell_count(tmp_path):
    """Peak RSS for 20x the cells stays within a small margin (chunked writing)."""
    code = ("import resource,sys; from celljepa_dist.data.simulate import SimulationConfig, write_store; "
            "write_store(sys.argv[1], SimulationConfig(cells=int(sys.argv[2]), genes=1000, seed=0), progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    rss = {}
    for n in (50_000, 1_000_000):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"s{n}"), str(n)], check=True,
                             capture_output=True, text=True).stdout
        rss[n] = int(out.strip().splitlines()[-1])
    assert rss[1_000_000] < 1.3 * rss[50_000] + 100_000, rss
