"""Faults of the data tools (issue 12): inputs that yield nothing, missing labels, edited shard
sets, unreadable inputs, counts in adata.raw, and a failed build's settings record.

Real h5ad files and TileDB-SOMA stores written in tmp_path, real shard tars; the CLIs run
in-process through their own main(argv) (one subprocess checks what a shell sees). References
are independent: the label lists and count matrices the tests write, and builds from plain
count files.
"""
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_data_build import anndata_store
from test_multi_h5ad import _tool_main, all_cells, poisson_counts, subprocess_cli, write_h5ad

from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import CensusSource, CensusSourceConfig, H5adSource, H5adSourceConfig
from celljepa_dist.data.shard_reader import block_labels
from celljepa_dist.data.shards import (
    build_manifest,
    empty_block,
    read_manifest,
    validate_shards,
    write_manifest,
    write_shard,
)
from celljepa_dist.data.vocab import GeneVocab

REPO = Path(__file__).resolve().parents[1]
GENES = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14"]


@pytest.fixture
def cli(capsys):
    """A CLI's main(argv) in this process: (exit code, stdout, stderr)."""
    def run(tool, *args):
        capsys.readouterr()
        try:
            code = _tool_main(tool)([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([tool, *args], code, out, err)
    return run


def assert_one_error_line(r, tool: str, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith(f"{tool}: error: ") and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "vocab.json"
    GeneVocab.from_genes(GENES, GENES).save(path)
    return path


# --- 5: inputs that yield nothing -----------------------------------------------------------------
def test_h5ad_without_genes_is_refused(tmp_path, vocab_path, cli):
    import anndata
    import scipy.sparse as sp

    path = tmp_path / "nogenes.h5ad"
    anndata.AnnData(sp.csr_matrix((5, 0), dtype=np.float32),
                    obs=pd.DataFrame(index=[f"c{i}" for i in range(5)])).write_h5ad(path)
    assert_one_error_line(cli("build_vocab.py", "--h5ad", path, "--out", tmp_path / "v2.json"),
                          "build_vocab", f"{path}: no genes")
    r = cli("h5ad_to_shards.py", "--h5ad", path, "--vocab", vocab_path, "--out", tmp_path / "s", "--no-progress")
    assert_one_error_line(r, "h5ad_to_shards", f"{path}: no genes")
    assert not (tmp_path / "s").exists() and not (tmp_path / "v2.json").exists()
    with pytest.raises(ValueError, match="no genes"):  # the single-file library source, too
        build_shards(H5adSource(H5adSourceConfig(str(path))), GeneVocab.load(vocab_path),
                     ShardBuildConfig(out=str(tmp_path / "s1")), progress=False)


def test_h5ad_of_empty_cells_is_refused_naming_the_file(tmp_path, vocab_path, cli):
    good = write_h5ad(tmp_path / "good.h5ad", poisson_counts(1, 12, len(GENES)), GENES)
    empty = write_h5ad(tmp_path / "empty.h5ad", np.zeros((7, len(GENES))), GENES)
    for files in ([empty], [good, empty]):  # alone, and hidden among good cells
        r = cli("h5ad_to_shards.py", "--h5ad", *files, "--vocab", vocab_path, "--out", tmp_path / "s",
                "--no-progress")
        assert_one_error_line(r, "h5ad_to_shards", f"{empty}: no cells left after filtering: all 7 cells are empty")
        assert str(good) not in r.stderr and not (tmp_path / "s" / "manifest.json").exists()
    assert not list((tmp_path / "s").glob("*"))  # no settings record, no shard


def test_build_keeping_no_cell_is_refused_with_counts_and_leaves_nothing(tmp_path, vocab_path, cli):
    """Non-zero values only in a gene outside the vocab: every cell is empty after mapping."""
    genes = GENES + ["OUTSIDE"]
    counts = np.zeros((9, len(genes)), np.float32)
    counts[:, -1] = 3
    path = write_h5ad(tmp_path / "outside.h5ad", counts, genes)
    out = tmp_path / "s"
    r = cli("h5ad_to_shards.py", "--h5ad", path, "--vocab", vocab_path, "--out", out, "--cells-per-shard", 4,
            "--no-progress")
    assert_one_error_line(r, "h5ad_to_shards", "no cells left after filtering: all 9 cells are empty",
                          "skipped 9 empty cells", "9 entries and 1 genes not in the vocab", str(path))
    assert not [p for p in out.rglob("*") if p.is_file()]  # no manifest, shards, records or build.json
    # The corrected file into the same directory builds.
    counts[:, 0] = 1
    write_h5ad(path, counts, genes)
    r = cli("h5ad_to_shards.py", "--h5ad", path, "--vocab", vocab_path, "--out", out, "--cells-per-shard", 4,
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert read_manifest(out)["total_cells"] == 9 and validate_shards(out) == []


def test_validate_refuses_a_manifest_of_zero_cells(tmp_path, cli):
    entry = write_shard(tmp_path / "shard-000000.tar", empty_block(["cell_type"]))
    write_manifest(tmp_path, build_manifest([entry], "0" * 64, 51, {"kind": "test"}))
    faults = validate_shards(tmp_path)
    assert faults == ["manifest.json: 0 cells in 1 shards (nothing to train on)"]
    r = cli("validate_shards.py", tmp_path)
    assert r.returncode == 1 and "0 cells" in r.stderr and "ok" not in r.stdout


# --- 6: missing labels ----------------------------------------------------------------------------
def test_missing_labels_are_unknown_never_a_class(tmp_path, vocab_path, cli):
    # NaN in a categorical, None, an empty category and the text a NaN became through astype(str)
    raw_labels = ["T", None, "B", np.nan, "", "T", "nan", "B", "Mono", "T", " ", "None"]
    missing = [v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip().lower() in ("", "nan", "none")
               for v in raw_labels]
    a = write_h5ad(tmp_path / "a.h5ad", poisson_counts(3, len(raw_labels), len(GENES)), GENES,
                   obs={"ct": pd.Categorical(raw_labels)})
    b = write_h5ad(tmp_path / "b.h5ad", poisson_counts(4, 5, len(GENES)), GENES,
                   obs={"ct": ["B", "NK", "NK", "B", "T"]})
    r = cli("h5ad_to_shards.py", "--h5ad", a, b, "--vocab", vocab_path, "--out", tmp_path / "s", "--label-key", "ct",
            "--cells-per-shard", 7, "--no-progress")
    assert r.returncode == 0, r.stderr
    names = sorted({v for v, m in zip(raw_labels, missing) if not m} | {"B", "NK", "T"})
    m = read_manifest(tmp_path / "s")
    assert m["labels"] == names == ["B", "Mono", "NK", "T"]
    cells = all_cells(tmp_path / "s")
    expected = [-1 if mi else names.index(v) for v, mi in zip(raw_labels, missing)] + \
        [names.index(v) for v in ["B", "NK", "NK", "B", "T"]]
    assert cells.meta["label"] == expected
    assert cells.meta["cell_type"][:len(raw_labels)] == ["" if mi else v for v, mi in zip(raw_labels, missing)]
    assert block_labels(cells, "all").tolist() == expected  # what the loader trains and scores with
    n_missing = sum(missing)
    assert f"{n_missing} cells without a label in ct (a.h5ad)" in r.stdout and "(b.h5ad)" not in r.stdout
    assert [f["cells_without_label"] for f in m["source"]["files"]] == [n_missing, 0]
    # The single-file library source encodes the same.
    src = H5adSource(H5adSourceConfig(str(a), label_key="ct"))
    assert src.labels == ["B", "Mono", "T"] and src.cells_without_label == n_missing
    assert [-1 if c < 0 else src.labels[c] for c in src.obs["label"]] == \
        [-1 if mi else v for v, mi in zip(raw_labels, missing)]


# --- 7: validate_shards against the build ---------------------------------------------------------
@pytest.fixture
def built(tmp_path, vocab_path, cli):
    a = write_h5ad(tmp_path / "a.h5ad", poisson_counts(5, 25, len(GENES)), GENES)
    out = tmp_path / "s"
    r = cli("h5ad_to_shards.py", "--h5ad", a, "--vocab", vocab_path, "--out", out, "--cells-per-shard", 10,
            "--no-progress")
    assert r.returncode == 0 and validate_shards(out) == [], r.stderr
    return out


def test_validate_names_tars_the_manifest_does_not_list(built, cli):
    shutil.copy(built / "shard-000001.tar", built / "shard-000007.tar")
    faults = validate_shards(built)
    assert faults == [f"shard-000007.tar: in {built} but not listed in manifest.json"]
    r = cli("validate_shards.py", built)
    assert r.returncode == 1 and "shard-000007.tar" in r.stderr


def test_validate_reports_a_manifest_below_the_build(built, cli):
    """A manifest edited to drop the last shard is self-consistent (its total is its shards' sum),
    but the build made 25 cells in 3 shards: training would silently use 20."""
    manifest = json.loads((built / "manifest.json").read_text())
    dropped = manifest["shards"].pop()
    manifest["total_cells"] -= dropped["cells"]
    (built / "manifest.json").write_text(json.dumps(manifest))
    faults = validate_shards(built)
    assert f"{dropped['name']}: in {built} but not listed in manifest.json" in faults
    assert f"{dropped['name']}: built (record .parts/{dropped['name']}.json) but not listed in manifest.json" in faults
    assert ("manifest.json: total_cells 20 is below the build's 25 (build.json: 25 filtered cells - 0 empty): "
            "5 cells would not be trained on") in faults
    assert "manifest.json: lists 2 shards, the build (build.json) made 3" in faults
    # Even with the dropped tar and its record removed, the build record still tells.
    (built / dropped["name"]).unlink()
    (built / ".parts" / f"{dropped['name']}.json").unlink()
    assert [f for f in validate_shards(built) if "below the build" in f]
    r = cli("validate_shards.py", built)
    assert r.returncode == 1 and "5 cells would not be trained on" in r.stderr


# --- 9: unreadable inputs -------------------------------------------------------------------------
@pytest.fixture
def unreadable(tmp_path):
    good = write_h5ad(tmp_path / "good.h5ad", poisson_counts(6, 30, len(GENES)), GENES,
                      obs={"ct": ["a", "b", "c"] * 10})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.h5ad"
    text.write_text("cell,gene,count\n")
    (tmp_path / "folder.h5ad").mkdir()
    import h5py

    h5py.File(tmp_path / "plain.h5ad", "w").create_dataset("x", data=np.arange(3))  # HDF5, no AnnData
    return {"truncated": truncated, "not HDF5": text, "HDF5 without AnnData": tmp_path / "plain.h5ad",
            "a directory": tmp_path / "folder.h5ad"}


def test_unreadable_h5ad_is_one_error_line_in_every_tool(unreadable, tmp_path, vocab_path, cli):
    for what, path in unreadable.items():
        r = cli("build_vocab.py", "--h5ad", path, "--out", tmp_path / "v2.json")
        assert_one_error_line(r, "build_vocab", str(path))
        r = cli("h5ad_to_shards.py", "--h5ad", path, "--vocab", vocab_path, "--out", tmp_path / "s", "--no-progress")
        assert_one_error_line(r, "h5ad_to_shards", str(path))
        assert ("not a readable h5ad file" if what != "a directory" else "is a directory") in r.stderr, (what, r.stderr)
    assert not (tmp_path / "v2.json").exists() and not (tmp_path / "s").exists()
    # As a shell sees it: exit 2, one line, no traceback.
    r = subprocess_cli("h5ad_to_shards.py", "--h5ad", unreadable["truncated"], "--vocab", vocab_path, "--out",
                       tmp_path / "s")
    assert_one_error_line(r, "h5ad_to_shards", f"{unreadable['truncated']}: not a readable h5ad file")


def test_unreadable_h5ad_in_embed_and_evaluate(unreadable, tmp_path, capsys):
    import importlib.util

    def main_of(script):
        spec = importlib.util.spec_from_file_location(f"launch_{script}", REPO / "launch" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    embed, evaluate = main_of("embed"), main_of("evaluate")
    for what in ("truncated", "not HDF5"):
        path = unreadable[what]
        capsys.readouterr()
        rc = embed(["--model", str(tmp_path / "model"), "--h5ad", str(path), "--out", str(tmp_path / "o.h5ad")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"embed: error: {path}: not a readable h5ad file"), err
        rc = evaluate(["--h5ad", str(path), "--label-key", "ct", "--out", str(tmp_path / "ev")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"evaluate: error: {path}: not a readable h5ad file"), err


def test_directory_that_is_no_census_store_is_named(tmp_path, vocab_path, cli):
    (tmp_path / "notsoma").mkdir()
    (tmp_path / "notsoma" / "readme.txt").write_text("not a store")
    store = tmp_path / "notsoma"
    assert_one_error_line(cli("build_vocab.py", "--census-uri", store, "--out", tmp_path / "v2.json"),
                          "build_vocab", f"{store}: not a Census/SOMA store")
    r = cli("census_to_shards.py", "--census-uri", store, "--vocab", vocab_path, "--out", tmp_path / "s",
            "--no-progress")
    assert_one_error_line(r, "census_to_shards", f"{store}: not a Census/SOMA store")


# --- 10: counts in adata.raw ----------------------------------------------------------------------
@pytest.fixture
def normalised_with_raw(tmp_path):
    """counts/cells.h5ad: integer counts; norm/cells.h5ad: the same cells with X log-normalised
    on half the genes (as after HVG selection) and the counts of every gene in adata.raw."""
    import anndata

    genes = [f"GENE{i}" for i in range(40)]
    counts = poisson_counts(7, 33, len(genes))
    counts[5, :] = 0  # an empty cell: dropped in both builds alike
    obs = {"ct": np.random.default_rng(7).choice(["a", "b"], 33)}
    (tmp_path / "counts").mkdir()
    (tmp_path / "norm").mkdir()
    plain = write_h5ad(tmp_path / "counts" / "cells.h5ad", counts, genes, obs=obs)
    full = anndata.read_h5ad(plain)
    norm = full[:, ::2].copy()
    norm.raw = full
    per_cell = np.maximum(counts[:, ::2].sum(1, keepdims=True), 1)
    norm.X = np.log1p(counts[:, ::2] / per_cell * 1e4).astype(np.float32)
    norm.write_h5ad(tmp_path / "norm" / "cells.h5ad")
    return plain, tmp_path / "norm" / "cells.h5ad"


def test_layer_raw_builds_what_the_counts_file_builds(normalised_with_raw, tmp_path, cli):
    plain, norm = normalised_with_raw
    assert cli("build_vocab.py", "--h5ad", plain, "--out", tmp_path / "v_plain.json").returncode == 0
    r = cli("build_vocab.py", "--h5ad", norm, "--layer", "raw", "--out", tmp_path / "v_raw.json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v_raw.json").read_bytes() == (tmp_path / "v_plain.json").read_bytes()  # raw.var's genes
    # X is not counts: the error says where the counts are.
    r = cli("h5ad_to_shards.py", "--h5ad", norm, "--vocab", tmp_path / "v_raw.json", "--out", tmp_path / "x",
            "--no-progress")
    assert_one_error_line(r, "h5ad_to_shards", f"{norm}: cell", "is not an integer count",
                          "adata.raw holds integer counts: pass --layer raw")
    common = ["--vocab", tmp_path / "v_raw.json", "--label-key", "ct", "--cells-per-shard", 10, "--block-size", 4,
              "--no-progress"]
    r = cli("h5ad_to_shards.py", "--h5ad", norm, "--layer", "raw", "--out", tmp_path / "s_raw", *common)
    assert r.returncode == 0, r.stderr
    r = cli("h5ad_to_shards.py", "--h5ad", plain, "--out", tmp_path / "s_plain", *common)
    assert r.returncode == 0, r.stderr
    m_raw, m_plain = read_manifest(tmp_path / "s_raw"), read_manifest(tmp_path / "s_plain")
    assert m_raw["total_cells"] == 32 and m_raw["source"]["files"][0]["layer"] == "adata.raw"
    assert [s["sha256"] for s in m_raw["shards"]] == [s["sha256"] for s in m_plain["shards"]]  # byte-identical
    assert validate_shards(tmp_path / "s_raw") == []
    # A file without adata.raw: the error names the file and what it has.
    r = cli("h5ad_to_shards.py", "--h5ad", plain, "--layer", "raw", "--out", tmp_path / "y", *common)
    assert_one_error_line(r, "h5ad_to_shards", f"{plain}: layer 'raw' not found", "no adata.raw")


def test_embedding_reads_adata_raw(tmp_path):
    """zero-shot embedding of --layer raw equals that of a file holding the counts in X."""
    from test_zero_shot_embed import build_model, synthetic_counts

    from celljepa_dist.zero_shot import EmbeddingConfig, embed_anndata

    model = build_model(tmp_path / "m")
    counts = synthetic_counts(n_cells=12, seed=3)
    norm = counts[:, ::3].copy()
    norm.raw = counts
    norm.X = np.log1p(norm.X.toarray() * 7.0).astype(np.float32)
    cfg = dict(progress=False)
    want = embed_anndata(model, counts, EmbeddingConfig(**cfg)).embeddings
    got = embed_anndata(model, norm, EmbeddingConfig(layer="raw", **cfg)).embeddings
    np.testing.assert_allclose(got, want, atol=1e-6)


# --- 13d: a failed build's settings record --------------------------------------------------------
def test_failed_build_does_not_block_a_corrected_rerun(tmp_path):
    """A build that fails before finishing a shard (a fractional value in cell 2 of shard 0)
    leaves build.json; the corrected store into the same directory builds. Once a shard is
    committed, other settings stay refused."""
    X = np.random.default_rng(0).poisson(1.5, size=(20, 30)).astype(np.float32)
    X[:, 0] += 1
    vocab = GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(30)], [f"G{i}" for i in range(30)])
    bad = X.copy()
    bad[2, 7] = 1.5
    out = tmp_path / "s"

    def build(store):
        with CensusSource(CensusSourceConfig(uri=str(store))) as src:
            return build_shards(src, vocab, ShardBuildConfig(out=str(out), cells_per_shard=8), progress=False)

    with pytest.raises(ValueError, match="soma_joinid=2, gene ENSG00000000007.*not an integer"):
        build(anndata_store(tmp_path / "bad", bad))
    assert (out / "build.json").exists() and not list(out.glob("*.tar"))
    m = build(anndata_store(tmp_path / "fixed", X))
    assert m["total_cells"] == 20 and validate_shards(out, vocab.sha256) == []
    assert json.loads((out / "build.json").read_text())["source"]["uri"] == str(tmp_path / "fixed")
    with pytest.raises(ValueError, match=r"different settings \(source\) and holds 3 finished shards"):
        build(anndata_store(tmp_path / "other", X))


def test_bad_label_key_then_corrected_rerun_into_the_same_directory(tmp_path, vocab_path, cli):
    a = write_h5ad(tmp_path / "a.h5ad", poisson_counts(8, 9, len(GENES)), GENES, obs={"ct": ["x", "y", "z"] * 3})
    args = ["--h5ad", a, "--vocab", vocab_path, "--out", tmp_path / "s", "--no-progress"]
    assert_one_error_line(cli("h5ad_to_shards.py", *args, "--label-key", "celltype"), "h5ad_to_shards",
                          "label key 'celltype' not in obs")
    r = cli("h5ad_to_shards.py", *args, "--label-key", "ct")
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / "s")["labels"] == ["x", "y", "z"]


def test_a_write_failure_never_commits_the_shard_it_broke(tmp_path, monkeypatch):
    """The writer thread runs the tasks queued behind a failed write; the shard that lost a block
    must not then be closed and recorded as if complete. Futures that cannot be cancelled (they
    may already be running) make the queued tasks run every time."""
    from concurrent.futures import Future

    import celljepa_dist.data.build as B
    from celljepa_dist.data.shards import ShardWriter

    X = np.random.default_rng(1).poisson(1.5, size=(40, 30)).astype(np.float32)
    X[:, 0] += 1
    store = anndata_store(tmp_path / "st", X)
    vocab = GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(30)], [f"G{i}" for i in range(30)])
    monkeypatch.setattr(B, "READ_CHUNK_CELLS", 5)
    monkeypatch.setattr(Future, "cancel", lambda self: False)
    real, calls = ShardWriter._write_block, []

    def failing(self, pieces):
        calls.append(1)
        if len(calls) == 2:  # shard 0's second block of 4, while the rest of shard 0 is queued
            time.sleep(1.0)
            raise OSError(28, "No space left on device")
        return real(self, pieces)

    monkeypatch.setattr(ShardWriter, "_write_block", failing)
    with CensusSource(CensusSourceConfig(uri=str(store))) as src, pytest.raises(OSError, match="No space left"):
        build_shards(src, vocab, ShardBuildConfig(out=str(tmp_path / "s"), cells_per_shard=20, block_size=4),
                     progress=False)
    assert not list((tmp_path / "s").glob("*.tar")) and not list((tmp_path / "s").glob(".parts/*.json"))
    assert not list((tmp_path / "s").glob(".*.tmp"))
