"""h5ad_to_shards on real PBMC files and on AnnData with a raw-count layer."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celljepa_dist.data.binning import bin_cell_reference
from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import H5adSource, H5adSourceConfig
from celljepa_dist.data.shards import read_manifest, read_shard, validate_shards
from celljepa_dist.data.vocab import GeneVocab

REPO = Path(__file__).resolve().parents[1]


def cli(tool, *args):
    return subprocess.run([sys.executable, str(REPO / "data_tools" / tool), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_pbmc3k_log_normalised_needs_explicit_flag_then_keeps_labels(shared_data, tmp_path):
    import anndata

    h5ad = shared_data / "pbmc3k_clustifyr.h5ad"
    r = cli("build_vocab.py", "--h5ad", h5ad, "--out", tmp_path / "vocab.json")
    assert r.returncode == 0, r.stderr
    r = cli("h5ad_to_shards.py", "--h5ad", h5ad, "--vocab", tmp_path / "vocab.json", "--out", tmp_path / "s",
            "--label-key", "cell_type", "--no-progress")
    assert r.returncode == 2 and "not an integer" in r.stderr and "soma_joinid=0" in r.stderr
    assert not (tmp_path / "s" / "manifest.json").exists()
    r = cli("h5ad_to_shards.py", "--h5ad", h5ad, "--vocab", tmp_path / "vocab.json", "--out", tmp_path / "s2",
            "--label-key", "cell_type", "--allow-non-integer", "--cells-per-shard", "1000", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "s2")
    adata = anndata.read_h5ad(h5ad)
    assert m["total_cells"] == adata.n_obs and [s["cells"] for s in m["shards"]] == [1000, 1000, 638]
    assert m["labels"] == sorted(adata.obs["cell_type"].astype(str).unique())
    cells = read_shard(tmp_path / "s2" / "shard-000001.tar")
    names = [m["labels"][i] for i in cells.meta["label"]]
    assert names == adata.obs["cell_type"].astype(str).iloc[cells.joinids].tolist()
    vocab = GeneVocab.load(tmp_path / "vocab.json")
    X = adata.X.tocsr()
    for i in (0, 17, 999):
        c = cells.cell(i)
        row = X[c["joinid"]]
        np.testing.assert_array_equal(c["genes"], np.sort(row.indices) + 3)
        np.testing.assert_allclose(c["counts"], row.toarray()[0][np.sort(row.indices)])
        np.testing.assert_array_equal(c["bins"], bin_cell_reference(c["counts"], 51))
    assert validate_shards(tmp_path / "s2", vocab.sha256, len(vocab)) == []


def test_kang_by_gene_symbol_against_a_foreign_vocab(shared_data, tmp_path):
    """A vocab keyed by other ids still matches the h5ad's symbols by name; the rest is counted."""
    import anndata

    adata = anndata.read_h5ad(shared_data / "kang2018_pbmc_scgen.h5ad")
    symbols = adata.var["gene_symbol"].astype(str).tolist()
    vocab = GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(len(symbols) - 100)], symbols[100:])
    vocab.save(tmp_path / "v.json")
    src = H5adSource(H5adSourceConfig(str(shared_data / "kang2018_pbmc_scgen.h5ad"), label_key="cell_type",
                                      raw_check=False))
    m = build_shards(src, vocab, ShardBuildConfig(out=str(tmp_path / "s"), cells_per_shard=500), progress=False)
    assert m["skipped"]["genes_not_in_vocab"] == 100
    X = adata.X.tocsr()
    assert m["skipped"]["entries_not_in_vocab"] == int((X[:, :100] != 0).sum())
    assert len(m["labels"]) == 7


def test_raw_layer_is_used_and_checked(tmp_path):
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    counts = rng.poisson(1.5, size=(30, 40)).astype(np.float32)
    counts[0] = 0  # an empty cell
    logx = np.log1p(counts)
    adata = anndata.AnnData(sp.csr_matrix(logx), layers={"counts": sp.csr_matrix(counts)},
                            obs=pd.DataFrame({"celltype": rng.choice(["a", "b"], 30)}, index=[f"c{i}" for i in range(30)]),
                            var=pd.DataFrame(index=[f"G{i}" for i in range(40)]))
    adata.write_h5ad(tmp_path / "a.h5ad")
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(40)], [f"G{i}" for i in range(40)])
    src = H5adSource(H5adSourceConfig(str(tmp_path / "a.h5ad"), layer="counts", label_key="celltype"))
    m = build_shards(src, vocab, ShardBuildConfig(out=str(tmp_path / "s"), cells_per_shard=7), progress=False)
    assert m["total_cells"] == 29 and m["skipped"]["empty_cells"] == 1
    assert m["source"]["layer"] == "counts" and m["labels"] == ["a", "b"]
    cells = read_shard(tmp_path / "s" / "shard-000000.tar")
    c = cells.cell(0)
    assert c["joinid"] == 1
    np.testing.assert_array_equal(c["counts"], counts[1][counts[1] > 0])
    with pytest.raises(ValueError, match="not an integer"):
        src_x = H5adSource(H5adSourceConfig(str(tmp_path / "a.h5ad")))
        build_shards(src_x, vocab, ShardBuildConfig(out=str(tmp_path / "x")), progress=False)
    with pytest.raises(ValueError, match="layer 'nope'"):
        H5adSource(H5adSourceConfig(str(tmp_path / "a.h5ad"), layer="nope"))
    with pytest.raises(ValueError, match="label key 'nope'"):
        H5adSource(H5adSourceConfig(str(tmp_path / "a.h5ad"), label_key="nope"))
