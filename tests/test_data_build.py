"""census_to_shards end to end on real TileDB-SOMA stores: content, K-job independence, resume, bad input."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celljepa_dist.data.binning import bin_cell_reference
from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import CensusSource, CensusSourceConfig, coo_rows_to_csr, runs_to_ranges
from celljepa_dist.data.shards import read_shard, validate_shards
from celljepa_dist.data.simulate import SimulationConfig, write_store
from celljepa_dist.data.vocab import GeneVocab

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    path = write_store(root / "census", SimulationConfig(cells=900, genes=1500, seed=5), progress=False)
    with CensusSource(CensusSourceConfig(uri=str(path))) as src:
        vocab = GeneVocab.from_genes(src.feature_ids, src.feature_names)
    vocab.save(root / "vocab.json")
    return path, root / "vocab.json"


def build(store_path, vocab_path, out, **kw):
    flt = kw.pop("obs_filter", None)
    cfg = CensusSourceConfig(uri=str(store_path), **({"obs_filter": flt} if flt else {}))
    with CensusSource(cfg) as src:
        return build_shards(src, GeneVocab.load(vocab_path), ShardBuildConfig(out=str(out), **kw), progress=False)


def dense_store(store_path):
    """Independent read of the whole (small) store with plain tiledbsoma: obs frame + dense X."""
    import tiledbsoma as soma

    with soma.open(str(store_path)) as top:
        exp = top["census_data"]["homo_sapiens"]
        obs = exp.obs.read().concat().to_pandas().set_index("soma_joinid").sort_index()
        n_var = len(exp.ms["RNA"].var.read().concat())
        t = exp.ms["RNA"].X["raw"].read().tables().concat()
    X = np.zeros((len(obs), n_var), np.float32)
    X[t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy()] = t["soma_data"].to_numpy()
    return obs, X


def tree_bytes(d: Path):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_shards_hold_exactly_the_filtered_cells(store, tmp_path):
    store_path, vocab_path = store
    m = build(store_path, vocab_path, tmp_path / "s", cells_per_shard=60, block_size=16)
    obs, X = dense_store(store_path)
    expected = obs[(obs.tissue_general == "kidney") & obs.is_primary_data]
    assert m["total_cells"] == len(expected) > 100 and m["filtered_cells"] == len(expected)
    assert [s["cells"] for s in m["shards"]][:-1] == [60] * (len(m["shards"]) - 1)
    assert validate_shards(tmp_path / "s", GeneVocab.load(vocab_path).sha256) == []
    cells = [c for s in m["shards"] for c in (lambda b: [b.cell(i) for i in range(len(b))])(read_shard(tmp_path / "s" / s["name"]))]
    assert [c["joinid"] for c in cells] == expected.index.tolist()
    for c in cells[::7]:
        row = X[c["joinid"]]
        genes = np.flatnonzero(row)
        np.testing.assert_array_equal(c["genes"], genes + 3)  # vocab built in var order: token = var + 3
        np.testing.assert_array_equal(c["counts"], row[genes])
        np.testing.assert_array_equal(c["bins"], bin_cell_reference(row[genes], 51))
        for col in ("cell_type", "dataset_id", "donor_id", "assay"):
            assert c[col] == expected.loc[c["joinid"], col]


def test_output_is_independent_of_job_count_and_manifest_waits_for_all(store, tmp_path):
    store_path, vocab_path = store
    build(store_path, vocab_path, tmp_path / "k1", cells_per_shard=50)
    results = [build(store_path, vocab_path, tmp_path / "k3", cells_per_shard=50, num_jobs=3, job_index=i)
               for i in (2, 0, 1)]
    assert results[0] is None and results[1] is None and results[2] is not None
    assert tree_bytes(tmp_path / "k1") == tree_bytes(tmp_path / "k3")


def test_rerun_skips_verified_shards_and_rebuilds_damaged_ones(store, tmp_path):
    store_path, vocab_path = store
    build(store_path, vocab_path, tmp_path / "s", cells_per_shard=80)
    before = tree_bytes(tmp_path / "s")
    victim = tmp_path / "s" / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated: must be rebuilt
    mtime0 = (tmp_path / "s" / "shard-000000.tar").stat().st_mtime_ns
    build(store_path, vocab_path, tmp_path / "s", cells_per_shard=80)
    assert tree_bytes(tmp_path / "s") == before
    assert (tmp_path / "s" / "shard-000000.tar").stat().st_mtime_ns == mtime0  # verified, skipped


@pytest.mark.multiproc
def test_killed_job_resumes_to_identical_output(store, tmp_path):
    store_path, vocab_path = store
    build(store_path, vocab_path, tmp_path / "ref", cells_per_shard=4, block_size=2)
    cmd = [sys.executable, str(REPO / "data_tools" / "census_to_shards.py"), "--census-uri", str(store_path),
           "--vocab", str(vocab_path), "--out", str(tmp_path / "run"), "--cells-per-shard", "4", "--block-size", "2",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = tmp_path / "run" / ".parts"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("*.json")) if parts.exists() else []) < 3:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.skip("the job finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "manifest.json").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert tree_bytes(tmp_path / "run") == tree_bytes(tmp_path / "ref")
    assert not list((tmp_path / "run").glob(".shard-*.tmp"))


def test_changed_settings_on_an_existing_output_are_refused(store, tmp_path):
    store_path, vocab_path = store
    build(store_path, vocab_path, tmp_path / "s", cells_per_shard=80)
    with pytest.raises(ValueError, match="cells_per_shard"):
        build(store_path, vocab_path, tmp_path / "s", cells_per_shard=90)


def test_genes_outside_the_vocab_are_dropped_and_counted(store, tmp_path):
    store_path, _ = store
    with CensusSource(CensusSourceConfig(uri=str(store_path))) as src:
        ids, names = src.feature_ids, src.feature_names
    keep = np.arange(len(ids)) % 3 != 0  # a vocab lacking every third gene, in reversed order
    sub = GeneVocab.from_genes([f for f, k in zip(ids, keep) if k][::-1], [n for n, k in zip(names, keep) if k][::-1])
    sub.save(tmp_path / "sub.json")
    m = build(store_path, tmp_path / "sub.json", tmp_path / "s", cells_per_shard=100)
    obs, X = dense_store(store_path)
    sel = obs[(obs.tissue_general == "kidney") & obs.is_primary_data].index.to_numpy()
    assert m["skipped"]["genes_not_in_vocab"] == (~keep).sum()
    assert m["skipped"]["entries_not_in_vocab"] == int((X[sel][:, ~keep] > 0).sum())
    cells = read_shard(tmp_path / "s" / "shard-000000.tar")
    c = cells.cell(0)
    assert (np.diff(c["genes"]) > 0).all()  # ascending token order although the vocab reversed genes
    row = X[c["joinid"]]
    tok_of_var = {v: sub.map_genes([ids[v]])[0][0] for v in np.flatnonzero(row)}
    expect = sorted((t, row[v]) for v, t in tok_of_var.items() if t >= 0)
    np.testing.assert_array_equal(c["genes"], [t for t, _ in expect])
    np.testing.assert_array_equal(c["counts"], [x for _, x in expect])
    np.testing.assert_array_equal(c["bins"], bin_cell_reference(np.array([x for _, x in expect], np.float32), 51))


def test_too_few_matching_genes_is_an_error(store, tmp_path):
    store_path, _ = store
    GeneVocab.from_genes([f"ENSG9{i:010d}" for i in range(50)], [f"X{i}" for i in range(50)]).save(tmp_path / "v.json")
    with pytest.raises(ValueError, match="genes are in the vocab"):
        build(store_path, tmp_path / "v.json", tmp_path / "s")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_filter_matching_no_cell_names_the_filter(store, tmp_path):
    store_path, vocab_path = store
    with pytest.raises(ValueError, match="tissue_general == 'pancreas'"):
        build(store_path, vocab_path, tmp_path / "s", obs_filter="tissue_general == 'pancreas'")


def test_other_filters_and_duplicates(store, tmp_path):
    store_path, vocab_path = store
    m = build(store_path, vocab_path, tmp_path / "s", cells_per_shard=1000, obs_filter="is_primary_data == False")
    obs, X = dense_store(store_path)
    dups = obs[~obs.is_primary_data]
    assert m["total_cells"] == len(dups) > 0


# --- bad input in a store built with tiledbsoma.io.from_anndata -------------------------------

def anndata_store(root: Path, X, feature_ids=None):
    import anndata
    import scipy.sparse as sp
    import tiledbsoma as soma
    import tiledbsoma.io

    n, g = X.shape
    obs = pd.DataFrame({"dataset_id": "d", "donor_id": "x", "assay": "10x", "cell_type": "t", "tissue": "kidney",
                        "tissue_general": "kidney", "disease": "normal", "suspension_type": "cell",
                        "is_primary_data": True}, index=[str(i) for i in range(n)])
    fids = feature_ids or [f"ENSG{i:011d}" for i in range(g)]
    var = pd.DataFrame({"feature_id": fids, "feature_name": [f"G{i}" for i in range(g)]}, index=[str(i) for i in range(g)])
    with soma.Collection.create(str(root)) as top:
        top.add_new_collection("census_data")
    tiledbsoma.io.from_anndata(str(root / "census_data" / "homo_sapiens"),
                               anndata.AnnData(sp.csr_matrix(X, dtype=np.float32), obs=obs, var=var),
                               measurement_name="RNA", X_layer_name="raw")
    with soma.open(str(root / "census_data"), mode="w") as cd:
        cd.set("homo_sapiens", soma.open(str(root / "census_data" / "homo_sapiens")), use_relative_uri=True)
    return root


@pytest.mark.parametrize("bad,msg", [(np.nan, "not finite"), (-2.0, "negative"), (1.5, "not an integer")])
def test_bad_values_name_cell_and_gene(tmp_path, bad, msg):
    X = np.random.default_rng(0).poisson(1.0, size=(20, 30)).astype(np.float32)
    X[13, 7] = bad
    root = anndata_store(tmp_path / "st", X)
    GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(30)], [f"G{i}" for i in range(30)]).save(tmp_path / "v.json")
    with pytest.raises(ValueError, match=rf"soma_joinid=13, gene ENSG00000000007.*{msg}"):
        build(root, tmp_path / "v.json", tmp_path / "s", cells_per_shard=8)
    assert not (tmp_path / "s" / "shard-000001.tar").exists()  # the faulty shard is not half-written


def test_empty_cells_are_skipped_and_counted(tmp_path):
    X = np.random.default_rng(1).poisson(2.0, size=(25, 30)).astype(np.float32)
    X[[3, 4, 17]] = 0
    root = anndata_store(tmp_path / "st", X)
    GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(30)], [f"G{i}" for i in range(30)]).save(tmp_path / "v.json")
    m = build(root, tmp_path / "v.json", tmp_path / "s", cells_per_shard=10)
    assert m["skipped"]["empty_cells"] == 3 and m["total_cells"] == 22
    assert [s["cells"] for s in m["shards"]] == [8, 9, 5]  # membership fixed before dropping
    joinids = np.concatenate([read_shard(tmp_path / "s" / s["name"]).joinids for s in m["shards"]])
    assert 3 not in joinids and 17 not in joinids and len(joinids) == 22


def test_duplicate_x_entries_name_cell_and_gene(tmp_path):
    """The Census X schema allows duplicate coordinates; a cell with two values for one gene is
    refused with both named (found while building the CSR rows)."""
    import pyarrow as pa
    import tiledbsoma as soma

    path = write_store(tmp_path / "census", SimulationConfig(cells=60, genes=500, seed=2), progress=False)
    x_uri = str(path / "census_data" / "homo_sapiens" / "ms" / "RNA" / "X" / "raw")
    with soma.open(x_uri) as X:
        t = X.read(coords=(slice(40, 40),)).tables().concat()
    gene = int(t["soma_dim_1"].to_numpy()[3])
    with soma.open(x_uri, mode="w") as X:  # a second fragment repeating one (cell, gene) entry
        X.write(pa.Table.from_pydict({"soma_dim_0": pa.array([40], pa.int64()), "soma_dim_1": pa.array([gene], pa.int64()),
                                      "soma_data": pa.array([5.0], pa.float32())}))
    with CensusSource(CensusSourceConfig(uri=str(path), obs_filter="is_primary_data == True")) as src:
        vocab = GeneVocab.from_genes(src.feature_ids, src.feature_names)
        with pytest.raises(ValueError, match=rf"soma_joinid=40 has more than one X\['raw'\] entry for gene "
                                             rf"{src.feature_ids[gene]}"):
            build_shards(src, vocab, ShardBuildConfig(out=str(tmp_path / "s")), progress=False)
    assert not list((tmp_path / "s").glob("*.tar"))


def test_writer_thread_failure_stops_the_build_and_a_rerun_completes_it(store, tmp_path, monkeypatch):
    """A write error in the writer thread (here: a full disk in shard 1's third block) surfaces in
    the caller, keeps the finished shard 0, leaves no temp file and no half shard, and a re-run
    ends byte-identical."""
    import celljepa_dist.data.build as B
    from celljepa_dist.data.shards import ShardWriter

    store_path, vocab_path = store
    build(store_path, vocab_path, tmp_path / "clean", cells_per_shard=100, block_size=16)
    monkeypatch.setattr(B, "READ_CHUNK_CELLS", 40)
    real, calls = ShardWriter._write_block, []

    def failing(self, pieces):
        calls.append(1)
        if len(calls) == 10:  # 100-cell shards hold 7 blocks of <= 16 cells
            raise OSError(28, "No space left on device")
        return real(self, pieces)

    monkeypatch.setattr(ShardWriter, "_write_block", failing)
    with pytest.raises(OSError, match="No space left"):
        build(store_path, vocab_path, tmp_path / "s", cells_per_shard=100, block_size=16)
    assert not list((tmp_path / "s").glob(".*.tmp"))
    assert sorted(p.name for p in (tmp_path / "s").glob("*.tar")) == ["shard-000000.tar"]
    assert sorted(p.name for p in (tmp_path / "s" / ".parts").glob("*.json")) == ["shard-000000.tar.json"]
    monkeypatch.setattr(ShardWriter, "_write_block", real)
    build(store_path, vocab_path, tmp_path / "s", cells_per_shard=100, block_size=16)
    assert tree_bytes(tmp_path / "s") == tree_bytes(tmp_path / "clean")


def test_read_settings_do_not_change_the_output(store, tmp_path):
    """TileDB buffer size and thread counts are performance knobs, not part of the build's identity:
    a tiny read buffer (many partial reads per chunk) gives the same bytes."""
    store_path, vocab_path = store
    build(store_path, vocab_path, tmp_path / "a", cells_per_shard=100)
    tiny = {"soma.init_buffer_bytes": 1 << 16, "sm.compute_concurrency_level": 2}
    with CensusSource(CensusSourceConfig(uri=str(store_path), tiledb_config=tiny)) as src:
        native = src.X.context.native_context.config()  # what TileDB itself was given
        assert native["sm.mem.malloc_trim"] == "false" and native["sm.io_concurrency_level"] == "1"
        assert native["sm.compute_concurrency_level"] == "2" and native["soma.init_buffer_bytes"] == str(1 << 16)
        build_shards(src, GeneVocab.load(vocab_path), ShardBuildConfig(out=str(tmp_path / "b"), cells_per_shard=100),
                     progress=False)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_malloc_tuning_applies_on_glibc():
    code = "from celljepa_dist.data.allocator import tune_malloc_for_reading as t; print(t())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import platform

    assert out == ("True" if platform.libc_ver()[0] == "glibc" else "False")


def test_duplicate_feature_ids_are_an_error(tmp_path):
    X = np.ones((4, 3), np.float32)
    root = anndata_store(tmp_path / "st", X, feature_ids=["ENSG1", "ENSG2", "ENSG1"])
    GeneVocab.from_genes(["ENSG1", "ENSG2"], ["a", "b"]).save(tmp_path / "v.json")
    with pytest.raises(ValueError, match="duplicate feature_id 'ENSG1'"):
        build(root, tmp_path / "v.json", tmp_path / "s")


# --- small pure helpers --------------------------------------------------------------------------

def test_runs_to_ranges_and_csr_from_unsorted_coo():
    assert runs_to_ranges(np.array([1, 2, 3, 100, 101, 500]), max_gap=10) == [(1, 3), (100, 101), (500, 500)]
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.5, size=(40, 25)).astype(np.float32)
    r, c = np.nonzero(dense)
    perm = rng.permutation(len(r))
    joinids = np.array([2, 3, 9, 10, 30, 39])
    indptr, cols, vals = coo_rows_to_csr(joinids, r[perm], c[perm], dense[r, c][perm])
    for k, j in enumerate(joinids):
        np.testing.assert_array_equal(cols[indptr[k]:indptr[k + 1]], np.flatnonzero(dense[j]))
        np.testing.assert_array_equal(vals[indptr[k]:indptr[k + 1]], dense[j][dense[j] > 0])


def test_read_chunking_does_not_change_the_output(store, tmp_path, monkeypatch):
    import celljepa_dist.data.build as B

    store_path, vocab_path = store
    build(store_path, vocab_path, tmp_path / "a", cells_per_shard=100)
    monkeypatch.setattr(B, "READ_CHUNK_CELLS", 7)
    build(store_path, vocab_path, tmp_path / "b", cells_per_shard=100)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


@pytest.mark.parametrize("kw,msg", [({}, "exactly one"), ({"uri": "x", "census_version": "2023-05-15"}, "exactly one"),
                                    ({"census_version": "stable"}, "pin a dated release")])
def test_source_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CensusSourceConfig(**kw).validate()


def test_missing_store_and_unknown_organism_are_named(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CensusSource(CensusSourceConfig(uri=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="organism 'Mus musculus' not found"):
        CensusSource(CensusSourceConfig(uri=str(store[0]), organism="Mus musculus"))


@pytest.mark.parametrize("field,value", [("cells_per_shard", 0), ("n_bins", 2), ("num_jobs", 0), ("job_index", 3),
                                         ("min_gene_match", 1.5), ("block_size", 0)])
def test_build_config_validation_names_the_field(field, value):
    cfg = ShardBuildConfig(out="x", num_jobs=3)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def test_prefetching_does_not_change_the_output(store, tmp_path, monkeypatch):
    import celljepa_dist.data.build as B

    store_path, vocab_path = store
    monkeypatch.setattr(B, "READ_CHUNK_CELLS", 16)
    build(store_path, vocab_path, tmp_path / "a", cells_per_shard=50)
    monkeypatch.setattr(B, "PREFETCH_CHUNKS", 0)
    build(store_path, vocab_path, tmp_path / "b", cells_per_shard=50)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
