"""Several h5ad files -> one vocabulary and one shard set (data_tools/build_vocab.py, h5ad_to_shards.py).

Small real AnnData files written in tmp_path, plus the shared real cells (Kang, Baron, Moncada, PISCES).
References are independent: naive first-appearance unions, the files' own obs columns, and
single-file builds of each file.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celljepa_dist.data.binning import bin_cell_reference
from celljepa_dist.data.gene_ids import FileGenes, GeneMap, detect_scheme, resolve_genes, union_genes
from celljepa_dist.data.shards import CellBlock, read_manifest, read_shard, validate_shards
from celljepa_dist.data.vocab import GeneVocab

REPO = Path(__file__).resolve().parents[1]


def subprocess_cli(tool, *args):
    return subprocess.run([sys.executable, str(REPO / "data_tools" / tool), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _tool_main(tool):
    spec = importlib.util.spec_from_file_location(f"data_tools_{tool[:-3]}", REPO / "data_tools" / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def cli(capsys):
    """The CLI's own main(argv) in this process (a subprocess costs ~2 s of imports per call):
    same argparse, same exit codes, stdout/stderr captured."""
    def run(tool, *args):
        capsys.readouterr()
        try:
            code = _tool_main(tool)([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([tool, *args], code, out, err)
    return run


def write_h5ad(path, counts, genes, obs=None, var=None):
    import anndata
    import scipy.sparse as sp

    n = counts.shape[0]
    obs_df = pd.DataFrame(obs or {}, index=[f"{Path(path).stem}_cell{i}" for i in range(n)])
    var_df = pd.DataFrame(var or {}, index=list(genes))
    anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs_df, var=var_df).write_h5ad(path)
    return path


def poisson_counts(seed, n_cells, n_genes):
    counts = np.random.default_rng(seed).poisson(1.2, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # every cell expresses something
    return counts


def all_cells(shards_dir) -> CellBlock:
    m = read_manifest(shards_dir)
    return CellBlock.concat([read_shard(Path(shards_dir) / s["name"]) for s in m["shards"]])


def cell_genes(block: CellBlock, i: int, vocab: GeneVocab) -> dict:
    """feature_id -> (count, bin) of cell i."""
    c = block.cell(i)
    return {vocab.feature_ids[t - 3]: (float(v), int(b)) for t, v, b in zip(c["genes"], c["counts"], c["bins"])}


@pytest.fixture
def two_files(tmp_path):
    a_genes = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "CD14"]
    b_genes = ["INS", "LYZ", "GCG", "CD3E", "SST", "PRSS1", "KRT19"]
    a = write_h5ad(tmp_path / "pbmc_a.h5ad", poisson_counts(1, 23, len(a_genes)), a_genes,
                   obs={"cell_type": np.random.default_rng(1).choice(["T", "B", "Mono"], 23)})
    b = write_h5ad(tmp_path / "islet_b.h5ad", poisson_counts(2, 17, len(b_genes)), b_genes,
                   obs={"cell_ontology_class": np.random.default_rng(2).choice(["alpha", "beta", "T"], 17)})
    return a, b, a_genes, b_genes


# --- gene-id schemes (library) -----------------------------------------------------------------
def test_detect_scheme_majority_and_ambiguity():
    ens = [f"ENSG{i:011d}" for i in range(95)]
    assert detect_scheme(ens + [f"ERCC-{i:05d}" for i in range(5)]).scheme == "ensembl"  # spike-ins tolerated
    assert detect_scheme(["CD3E", "LYZ", "ENSG00000283632.1"] + ["G%d" % i for i in range(20)]).scheme == "symbol"
    assert detect_scheme(["ENSMUSG00000000001", "ENSG00000141510.17"]).scheme == "ensembl"
    half = detect_scheme(ens[:50] + [f"G{i}" for i in range(50)])
    assert half.scheme is None and "50 of 100" in str(half)
    assert detect_scheme(["ENSGXYZ", "ENSG1"]).scheme == "symbol"  # not Ensembl-shaped


def test_union_is_first_appearance_and_collapses_ensembl_versions():
    f1 = FileGenes("a", "var_names", ("ENSG00000000003.14", "ENSG00000000005"), None, None, False)
    f2 = FileGenes("b", "var_names", ("ENSG00000000419", "ENSG00000000003.15", "ENSG00000000005"), None, None, False)
    union = union_genes([resolve_genes(f, "ensembl", None) for f in (f1, f2)], "ensembl")
    assert union.feature_ids == ("ENSG00000000003.14", "ENSG00000000005", "ENSG00000000419")
    assert union.columns == ((0, 1), (2, 0, 1))


def test_gene_map_format_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ensembl\tsymbol\nENSG00000000003\tTSPAN6\n")
    with pytest.raises(ValueError, match="line 1 must be the header"):
        GeneMap.load(bad)
    bad.write_text("feature_id\tfeature_name\nENSG00000000003\tTSPAN6\nENSG00000000003.2\tTSPAN6b\n")
    with pytest.raises(ValueError, match="ENSG00000000003.2.*lines 2 and 3"):
        GeneMap.load(bad)
    bad.write_text("feature_id\tfeature_name\nENSG00000000003 TSPAN6\n")
    with pytest.raises(ValueError, match="line 2 must be two"):
        GeneMap.load(bad)
    good = tmp_path / "good.tsv"
    good.write_text("feature_id\tfeature_name\nENSG1000000001\tA\nENSG1000000002\tB\nENSG1000000003\tB\n")
    gm = GeneMap.load(good)
    assert gm.symbol_of("ENSG1000000002.7") == "B" and gm.ensembl_of("A") == "ENSG1000000001"
    assert gm.ensembl_of("B") is None  # ambiguous symbol: never converted


# --- vocabulary ---------------------------------------------------------------------------------
def test_vocab_union_order_and_rebuild_identical(two_files, tmp_path, cli):
    a, b, a_genes, b_genes = two_files
    r = cli("build_vocab.py", "--h5ad", a, b, "--out", tmp_path / "v1.json")
    assert r.returncode == 0, r.stderr
    assert "gene-id scheme: symbol" in r.stdout
    vocab = GeneVocab.load(tmp_path / "v1.json")
    assert vocab.feature_ids == list(dict.fromkeys(a_genes + b_genes))
    assert vocab.feature_names == vocab.feature_ids
    # Repeated --h5ad and a rebuild give the same bytes; the other file order another vocab.
    r = cli("build_vocab.py", "--h5ad", a, "--h5ad", b, "--out", tmp_path / "v2.json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v1.json").read_bytes() == (tmp_path / "v2.json").read_bytes()
    r = cli("build_vocab.py", "--h5ad", b, a, "--out", tmp_path / "v3.json")
    assert GeneVocab.load(tmp_path / "v3.json").feature_ids == list(dict.fromkeys(b_genes + a_genes))


def test_mixed_schemes_refused_then_converted_with_a_gene_map(two_files, tmp_path, cli):
    a, _, a_genes, _ = two_files
    ens_ids = ["ENSG00000198851", "ENSG00000105374", "ENSG00000090382", "ERCC-00002",
               *(f"ENSG0000099999{i}" for i in range(6))]  # 9 of 10 Ensembl-shaped: a spike-in is tolerated
    symbols = {"ENSG00000198851": "CD3E", "ENSG00000105374": "NKG7", "ENSG00000090382": "LYZ"}
    counts_e = poisson_counts(3, 11, len(ens_ids))
    e = write_h5ad(tmp_path / "lines_e.h5ad", counts_e, ens_ids, obs={"cell_type": ["x"] * 11})
    r = cli("build_vocab.py", "--h5ad", a, e, "--out", tmp_path / "v.json")
    assert r.returncode == 2 and not (tmp_path / "v.json").exists()
    assert "different gene-id schemes" in r.stderr and str(a) in r.stderr and str(e) in r.stderr
    assert "ensembl (9 of 10 ids" in r.stderr and "symbol (0 of 6 ids" in r.stderr
    r = cli("build_vocab.py", "--h5ad", a, e, "--gene-id-scheme", "symbol", "--out", tmp_path / "v.json")
    assert r.returncode == 2 and str(e) in r.stderr and "--gene-map" in r.stderr and str(a) + ":" not in r.stderr

    gene_map = tmp_path / "map.tsv"
    gene_map.write_text("feature_id\tfeature_name\n" + "".join(f"{k}\t{v}\n" for k, v in symbols.items())
                        + "ENSG00000163736\tPPBP\n")
    # symbol scheme: the Ensembl file's genes become symbols; unmapped ones are left out.
    common = ["--h5ad", a, e, "--gene-id-scheme", "symbol", "--gene-map", gene_map]
    r = cli("build_vocab.py", *common, "--out", tmp_path / "vs.json")
    assert r.returncode == 0, r.stderr
    vs = GeneVocab.load(tmp_path / "vs.json")
    assert vs.feature_ids == a_genes  # CD3E, NKG7, LYZ already there
    r = cli("h5ad_to_shards.py", *common, "--vocab", tmp_path / "vs.json", "--out", tmp_path / "s", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "s")
    files = m["source"]["files"]
    assert m["source"]["gene_id_scheme"] == "symbol" and files[1]["genes_left_out"] == 7
    assert "via gene map map.tsv" in files[1]["gene_ids"] and m["source"]["gene_map"]["pairs"] == 4
    cells = all_cells(tmp_path / "s")
    for i in range(23, 34):
        row = counts_e[i - 23]
        expected = {symbols[g]: v for g, v in zip(ens_ids, row) if g in symbols and v > 0}
        got = cell_genes(cells, i, vs)
        assert {k: c for k, (c, _) in got.items()} == expected
        vals = np.array([expected[g] for g in sorted(expected, key=vs.feature_ids.index)], np.float32)
        assert [got[g][1] for g in sorted(got, key=vs.feature_ids.index)] == bin_cell_reference(vals, 51).tolist()

    # ensembl scheme: the symbol file is converted; the vocab records id and symbol.
    r = cli("build_vocab.py", "--h5ad", a, e, "--gene-id-scheme", "ensembl", "--gene-map", gene_map,
            "--out", tmp_path / "ve.json")
    assert r.returncode == 0, r.stderr
    ve = GeneVocab.load(tmp_path / "ve.json")
    inverse = {v: k for k, v in symbols.items()}
    a_mapped = [inverse[g] for g in a_genes if g in inverse]
    assert ve.feature_ids == list(dict.fromkeys(a_mapped + ens_ids))
    assert ve.feature_names == [symbols.get(f, f) for f in ve.feature_ids]


# --- shards -------------------------------------------------------------------------------------
def test_per_file_label_keys_joinids_and_dataset_ids(two_files, tmp_path, cli):
    import anndata

    a, b, _, _ = two_files
    r = cli("build_vocab.py", "--h5ad", a, b, "--out", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    r = cli("h5ad_to_shards.py", "--h5ad", a, b, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s",
            "--label-key", "cell_type", "islet_b=cell_ontology_class", "--cells-per-shard", "15", "--block-size", "4",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "s")
    cells = all_cells(tmp_path / "s")
    ad_a, ad_b = anndata.read_h5ad(a), anndata.read_h5ad(b)
    expected = (ad_a.obs["cell_type"].astype(str).tolist() + ad_b.obs["cell_ontology_class"].astype(str).tolist())
    assert m["labels"] == sorted(set(expected))  # "T" in both files is one class
    assert [m["labels"][i] for i in cells.meta["label"]] == expected
    assert cells.meta["cell_type"] == expected  # islet_b has no cell_type column: the label fills it
    assert cells.joinids.tolist() == list(range(40)) and len(set(cells.joinids.tolist())) == 40
    assert cells.meta["dataset_id"] == ["pbmc_a"] * 23 + ["islet_b"] * 17
    assert [f["first_joinid"] for f in m["source"]["files"]] == [0, 23]
    assert [f["label_key"] for f in m["source"]["files"]] == ["cell_type", "cell_ontology_class"]
    assert validate_shards(tmp_path / "s", GeneVocab.load(tmp_path / "v.json").sha256) == []


def test_missing_label_key_names_the_file_unless_allowed(two_files, tmp_path, cli):
    a, b, _, _ = two_files
    cli("build_vocab.py", "--h5ad", a, b, "--out", tmp_path / "v.json")
    r = cli("h5ad_to_shards.py", "--h5ad", a, b, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s",
            "--label-key", "cell_type", "--no-progress")
    assert r.returncode == 2 and str(b) in r.stderr and "'cell_type'" in r.stderr and str(a) not in r.stderr
    assert r.stderr.startswith("h5ad_to_shards: error:") and not (tmp_path / "s" / "manifest.json").exists()
    r = cli("h5ad_to_shards.py", "--h5ad", a, b, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s2",
            "--label-key", "cell_type", "--allow-missing-labels", "--no-progress")
    assert r.returncode == 0, r.stderr
    cells = all_cells(tmp_path / "s2")
    assert cells.meta["label"][23:] == [-1] * 17 and cells.meta["cell_type"][23:] == [""] * 17
    assert min(cells.meta["label"][:23]) >= 0
    # STEM= declares a file unlabelled without hiding a wrong key elsewhere.
    r = cli("h5ad_to_shards.py", "--h5ad", a, b, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s3",
            "--label-key", "cell_type", "islet_b=", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert all_cells(tmp_path / "s3").meta["label"] == cells.meta["label"]


def test_each_cell_equals_its_single_file_build(two_files, tmp_path, cli):
    a, b, _, _ = two_files
    cli("build_vocab.py", "--h5ad", a, b, "--out", tmp_path / "v.json")
    r = cli("h5ad_to_shards.py", "--h5ad", a, b, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    multi, vocab = all_cells(tmp_path / "s"), GeneVocab.load(tmp_path / "v.json")
    offset = 0
    for f in (a, b):
        r1 = cli("build_vocab.py", "--h5ad", f, "--out", tmp_path / f"{f.stem}.json")
        r2 = cli("h5ad_to_shards.py", "--h5ad", f, "--vocab", tmp_path / f"{f.stem}.json", "--out",
                 tmp_path / f.stem, "--no-progress")
        assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
        single, single_vocab = all_cells(tmp_path / f.stem), GeneVocab.load(tmp_path / f"{f.stem}.json")
        for i in range(len(single)):
            assert cell_genes(multi, offset + i, vocab) == cell_genes(single, i, single_vocab)
        offset += len(single)
    assert offset == len(multi)


def test_integer_check_is_per_file_and_names_it(two_files, tmp_path, cli):
    a, _, a_genes, _ = two_files
    lognorm = np.log1p(poisson_counts(4, 9, len(a_genes)))
    ln = write_h5ad(tmp_path / "lognorm.h5ad", lognorm, a_genes)
    cli("build_vocab.py", "--h5ad", a, ln, "--out", tmp_path / "v.json")
    r = cli("h5ad_to_shards.py", "--h5ad", a, ln, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s", "--no-progress")
    assert r.returncode == 2 and str(ln) in r.stderr and "not an integer" in r.stderr
    row, col = np.argwhere(lognorm != 0)[0]
    assert f"'lognorm_cell{row}' (row {row}, soma_joinid={23 + row}), gene {a_genes[col]}" in r.stderr
    r = cli("h5ad_to_shards.py", "--h5ad", a, ln, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s",
            "--allow-non-integer", "lognorm", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert [f["raw_check"] for f in read_manifest(tmp_path / "s")["source"]["files"]] == [True, False]
    # The exemption is for the named file only: a fractional value in pbmc_a still fails.
    frac = poisson_counts(1, 23, len(a_genes))
    frac[5, 2] = 2.5
    (tmp_path / "frac").mkdir()
    a2 = write_h5ad(tmp_path / "frac" / "pbmc_a.h5ad", frac, a_genes)
    r = cli("h5ad_to_shards.py", "--h5ad", a2, ln, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s2",
            "--allow-non-integer", "lognorm", "--no-progress")
    assert r.returncode == 2 and str(a2) in r.stderr and "soma_joinid=5), gene LYZ: value 2.5 is not an integer" in r.stderr


def test_rerun_is_a_no_op_and_a_lost_shard_is_rebuilt_identically(two_files, tmp_path, cli):
    a, b, _, _ = two_files
    cli("build_vocab.py", "--h5ad", a, b, "--out", tmp_path / "v.json")
    args = ["--h5ad", a, b, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s", "--label-key", "cell_type",
            "islet_b=cell_ontology_class", "--cells-per-shard", "10", "--no-progress"]
    assert cli("h5ad_to_shards.py", *args).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").glob("*") if p.is_file()}
    (tmp_path / "s" / "shard-000002.tar").unlink()
    (tmp_path / "s" / "manifest.json").unlink()
    r = cli("h5ad_to_shards.py", *args)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").glob("*") if p.is_file()} == before
    # The same --out with other label settings is refused, naming what changed.
    r = cli("h5ad_to_shards.py", *args[:7], "--label-key", "cell_type", "--allow-missing-labels",
            "--cells-per-shard", "10", "--no-progress")
    assert r.returncode == 2 and "different settings (source)" in r.stderr


def test_cli_bad_input_exits_2_with_clear_errors(two_files, tmp_path, cli):
    a, b, _, _ = two_files
    cli("build_vocab.py", "--h5ad", a, b, "--out", tmp_path / "v.json")
    shards = ["h5ad_to_shards.py", "--vocab", tmp_path / "v.json", "--out", tmp_path / "s", "--no-progress"]
    cases = [
        (["build_vocab.py", "--h5ad", a, a, "--out", tmp_path / "x.json"], "same stem 'pbmc_a'"),
        (["build_vocab.py", "--h5ad", a, tmp_path / "nope.h5ad", "--out", tmp_path / "x.json"], "nope.h5ad"),
        (["build_vocab.py", "--h5ad", a, "--gene-key", "pbmc_a=gene_ids", "--out", tmp_path / "x.json"],
         f"{a}: gene key 'gene_ids' is not a var column"),
        (["build_vocab.py", "--h5ad", a, "--gene-map", tmp_path / "nomap.tsv", "--out", tmp_path / "x.json"],
         "gene map not found"),
        ([*shards, "--h5ad", a, b, "--label-key", "cell_type", "islet=cell_ontology_class"],
         "--label-key: no file with stem 'islet'"),
        ([*shards, "--h5ad", a, b, "--label-key", "cell_type", "tissue"], "two values for all files"),
        ([*shards, "--h5ad", a, b, "--allow-non-integer", "pbmc"], "--allow-non-integer: no file with stem 'pbmc'"),
        ([*shards, "--h5ad", a, b, "--layer", "counts"], f"{a}: layer 'counts' not found"),
    ]
    for argv, message in cases:
        r = cli(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        tool = argv[0].removesuffix(".py")
        assert r.stderr.startswith(f"{tool}: error:") and message in r.stderr, (message, r.stderr)
    # The script itself, as a shell sees it.
    r = subprocess_cli("h5ad_to_shards.py", "--h5ad", a, b, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s",
                       "--label-key", "cell_type")
    assert r.returncode == 2 and r.stderr.startswith("h5ad_to_shards: error:") and str(b) in r.stderr
    ambiguous = write_h5ad(tmp_path / "amb.h5ad", poisson_counts(5, 3, 4),
                           ["ENSG00000000003", "ENSG00000000005", "CD3E", "LYZ"])
    r = cli("build_vocab.py", "--h5ad", ambiguous, "--out", tmp_path / "x.json")
    assert r.returncode == 2 and f"{ambiguous}: var_names ambiguous (2 of 4 ids" in r.stderr
    assert not (tmp_path / "x.json").exists()


# --- the real cells -------------------------------------------------------------------------------
REAL = {"kang2018_pbmc_scgen": "cell_type", "baron2016_pancreas_came": "cell_ontology_class",
        "moncada2020_pdac_cardspa": "cell_type", "pbmc1k_pisces": None}


def test_real_files_into_one_vocab_and_shard_set(shared_data, tmp_path):
    import anndata

    files = [shared_data / f"{stem}.h5ad" for stem in REAL]
    r = subprocess_cli("build_vocab.py", "--h5ad", *files, "--gene-id-scheme", "symbol", "--out", tmp_path / "vocab.json")
    assert r.returncode == 0, r.stderr
    r = subprocess_cli("h5ad_to_shards.py", "--h5ad", *files, "--gene-id-scheme", "symbol", "--vocab", tmp_path / "vocab.json",
            "--out", tmp_path / "s", "--label-key", "cell_type", "baron2016_pancreas_came=cell_ontology_class",
            "pbmc1k_pisces=", "--allow-non-integer", "kang2018_pbmc_scgen", "--cells-per-shard", "3000",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    vocab = GeneVocab.load(tmp_path / "vocab.json")
    m = read_manifest(tmp_path / "s")
    cells = all_cells(tmp_path / "s")
    adatas = {stem: anndata.read_h5ad(f) for stem, f in zip(REAL, files)}
    union = list(dict.fromkeys(g for ad in adatas.values() for g in map(str, ad.var_names)))
    assert vocab.feature_ids == union
    dataset_ids = pd.Series(cells.meta["dataset_id"])
    assert dataset_ids.value_counts().to_dict() == {stem: ad.n_obs for stem, ad in adatas.items()}
    assert m["total_cells"] == sum(ad.n_obs for ad in adatas.values()) and m["skipped"]["empty_cells"] == 0
    assert cells.joinids.tolist() == list(range(m["total_cells"]))
    names = [m["labels"][i] if i >= 0 else None for i in cells.meta["label"]]
    start = 0
    for stem, ad in adatas.items():
        got = names[start:start + ad.n_obs]
        assert got == (ad.obs[REAL[stem]].astype(str).tolist() if REAL[stem] else [None] * ad.n_obs), stem
        start += ad.n_obs
    # One Baron cell against its own matrix row, bins from the per-cell reference.
    X = adatas["baron2016_pancreas_came"].X.tocsr()
    i = 1975 + 100
    c = cells.cell(i)
    row = X[100]
    token = {g: t for t, g in enumerate(vocab.feature_ids)}
    order = np.argsort([token[str(g)] for g in adatas["baron2016_pancreas_came"].var_names[row.indices]])
    np.testing.assert_array_equal(c["counts"], row.data[order])
    np.testing.assert_array_equal(c["bins"], bin_cell_reference(row.data[order], 51))
    assert validate_shards(tmp_path / "s", vocab.sha256, len(vocab)) == []
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["source"]["gene_id_scheme"] == "symbol"
