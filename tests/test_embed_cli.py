"""launch/embed.py end to end: h5ad in -> h5ad out with obsm[key]; shards in; errors exit 2."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
from test_zero_shot_embed import build_model, synthetic_counts

from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import H5adSource, H5adSourceConfig
from celljepa_dist.data.vocab import GeneVocab

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "embed.py"


def load_cli():
    spec = importlib.util.spec_from_file_location("launch_embed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = load_cli()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_cli")
    model = build_model(root)
    adata = synthetic_counts(n_cells=30, seed=2)
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = np.random.default_rng(0).normal(size=(adata.n_obs, 3)).astype(np.float32)
    h5ad = root / "cells.h5ad"
    adata.write_h5ad(h5ad)
    return root, model, h5ad


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_h5ad_in_h5ad_out(setup, capsys, tmp_path):
    root, model, h5ad = setup
    out = tmp_path / "sub" / "out.h5ad"
    rc, stdout, err = run_cli(capsys, "--model", model, "--h5ad", h5ad, "--out", out, "--batch-size", 7,
                              "--no-progress")
    assert rc == 0, err
    assert "250 of 310 dataset genes" in stdout and "model's 300 vocab genes (83.3%)" in stdout
    assert "with the teacher encoder" in stdout and "obsm['X_celljepa'] (30, 32)" in stdout
    src, res = anndata.read_h5ad(h5ad), anndata.read_h5ad(out)
    emb = res.obsm["X_celljepa"]
    assert emb.shape == (30, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # Everything of the input is kept.
    assert (res.X != src.X).nnz == 0 and (res.layers["counts"] != src.layers["counts"]).nnz == 0
    assert res.obs.equals(src.obs) and res.var.equals(src.var)
    np.testing.assert_array_equal(res.obsm["X_pca"], src.obsm["X_pca"])
    assert res.uns["celljepa_embeddings"]["X_celljepa"]["encoder"] == "teacher"
    # The same numbers as the Python API; no temp file left beside the output.
    from celljepa_dist import embed

    np.testing.assert_allclose(emb, embed(model, src, verbose=False), atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.h5ad"]


def test_options_reach_the_embedding(setup, capsys, tmp_path):
    root, model, h5ad = setup
    out = tmp_path / "o.h5ad"
    rc, stdout, err = run_cli(capsys, "--model", model, "--h5ad", h5ad, "--out", out, "--key", "X_s",
                              "--encoder", "student", "--pooling", "mean", "--layer", "counts", "--max-genes", 20,
                              "--gene-selection", "highest", "--no-progress")
    assert rc == 0, err
    from celljepa_dist import embed

    want = embed(model, anndata.read_h5ad(h5ad), encoder="student", pooling="mean", layer="counts", max_genes=20,
                 gene_selection="highest", verbose=False)
    np.testing.assert_allclose(anndata.read_h5ad(out).obsm["X_s"], want, atol=1e-6)
    assert "student encoder (mean pooling" in stdout and "max_genes=20" in stdout


def test_shards_in(setup, capsys, tmp_path):
    """Shards built from the same h5ad with the model's vocab embed exactly like the h5ad."""
    root, model, h5ad = setup
    shards = tmp_path / "shards"
    source = H5adSource(H5adSourceConfig(str(h5ad), label_key="cell_type"))
    build_shards(source, GeneVocab.load(model / "vocab.json"), ShardBuildConfig(out=str(shards), cells_per_shard=8,
                                                                                block_size=4), progress=False)
    out = tmp_path / "shards.h5ad"
    rc, stdout, err = run_cli(capsys, "--model", model, "--shards", shards, "--out", out, "--no-progress")
    assert rc == 0, err
    res, src = anndata.read_h5ad(out), anndata.read_h5ad(h5ad)
    assert res.n_obs == src.n_obs and res.n_vars == 0
    assert list(res.obs_names) == [str(i) for i in range(src.n_obs)]
    assert res.obs["soma_joinid"].tolist() == list(range(src.n_obs))
    assert res.obs["cell_type"].tolist() == src.obs["cell_type"].tolist()
    assert res.obs["label_name"].tolist() == src.obs["cell_type"].tolist()
    from celljepa_dist import embed

    np.testing.assert_allclose(res.obsm["X_celljepa"], embed(model, src, verbose=False), atol=1e-6)

    # Shards built with another vocab are refused.
    other = tmp_path / "other_vocab.json"
    ids = list(src.var_names)
    GeneVocab.from_genes(ids, ids).save(other)
    wrong = tmp_path / "wrong_shards"
    build_shards(H5adSource(H5adSourceConfig(str(h5ad))), GeneVocab.load(other), ShardBuildConfig(out=str(wrong)),
                 progress=False)
    rc, _, err = run_cli(capsys, "--model", model, "--shards", wrong, "--out", tmp_path / "w.h5ad")
    assert rc == 2 and err.startswith("embed: error:") and "vocab sha256" in err


def test_errors_exit_2(setup, capsys, tmp_path):
    root, model, h5ad = setup
    out = tmp_path / "never.h5ad"
    cases = [
        (["--model", model, "--h5ad", tmp_path / "missing.h5ad"], "h5ad file not found"),
        (["--model", tmp_path / "nomodel", "--h5ad", h5ad], "model directory not found"),
        (["--model", model, "--h5ad", h5ad, "--layer", "spliced"], "layer 'spliced' not found; layers: ['counts']"),
        (["--model", model, "--h5ad", h5ad, "--gene-key", "cell_type"], "gene key 'cell_type' is not a var column"),
        (["--model", model, "--h5ad", h5ad, "--min-vocab-fraction", "0.9"], "only 250 of the model's 300 vocab genes"),
        (["--model", model, "--h5ad", h5ad, "--batch-size", "0"], "batch_size must be a positive int"),
    ]
    not_h5ad = tmp_path / "bad.h5ad"
    not_h5ad.write_text("not hdf5")
    cases.append((["--model", model, "--h5ad", not_h5ad], "not a readable h5ad file"))
    import torch

    if not torch.cuda.is_available():
        cases.append((["--model", model, "--h5ad", h5ad, "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        rc, stdout, err = run_cli(capsys, *argv, "--out", out, "--no-progress")
        assert rc == 2, (argv, err)
        assert err.startswith("embed: error:") and message in err, (argv, err)
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(model), "--shards", str(root), "--layer", "x", "--out", str(out)])
    assert exit_info.value.code == 2


def test_script_runs_as_a_program(setup, tmp_path):
    root, model, h5ad = setup
    out = tmp_path / "p.h5ad"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--h5ad", str(h5ad), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # the progress bar stays quiet when stderr is not a terminal
    assert anndata.read_h5ad(out).obsm["X_celljepa"].shape == (30, 32)
