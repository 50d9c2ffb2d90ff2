"""Matching a dataset's genes to a model's vocab: ids, symbols, var columns, versions, thresholds."""
import numpy as np
import pandas as pd
import pytest

from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.zero_shot.cells import check_no_empty_cells, matched_genes_per_cell
from celljepa_dist.zero_shot.genes import (
    DEFAULT_MIN_VOCAB_FRACTION,
    check_vocab_coverage,
    gene_labels,
    match_dataset_genes,
    match_genes,
)

N_VOCAB = 200
IDS = [f"ENSG{i:011d}" for i in range(N_VOCAB)]
SYMBOLS = [f"GENE{i}" for i in range(N_VOCAB)]


@pytest.fixture(scope="module")
def vocab():
    return GeneVocab.from_genes(IDS, SYMBOLS)


def naive_tokens(vocab_keys, dataset_labels):
    """Reference: a dict lookup, token = 3 (special tokens) + position in the vocab."""
    index = {k: 3 + i for i, k in enumerate(vocab_keys)}
    return np.array([index.get(x, -1) for x in dataset_labels])


def test_match_by_ensembl_id_in_var_names(vocab):
    labels = IDS[50:150] + [f"ENSG9{i:010d}" for i in range(40)]  # 40 genes the model never saw
    var = pd.DataFrame(index=labels)
    match = match_dataset_genes(vocab, var, min_vocab_fraction=0.5)
    np.testing.assert_array_equal(match.tokens, naive_tokens(IDS, labels))
    assert (match.n_matched, match.n_dataset_genes, match.n_vocab_genes) == (100, 140, 200)
    assert match.vocab_fraction == pytest.approx(0.5) and match.dataset_fraction == pytest.approx(100 / 140)
    assert "100 of 140 dataset genes" in match.describe() and "model's 200 vocab genes (50.0%)" in match.describe()


def test_match_by_symbol_in_var_names(vocab):
    labels = SYMBOLS[::-1][:120] + ["MT-FOO", "BAR"]  # reversed order: tokens follow the genes
    match = match_dataset_genes(vocab, pd.DataFrame(index=labels))
    np.testing.assert_array_equal(match.tokens, naive_tokens(SYMBOLS, labels))
    assert match.n_matched == 120


def test_match_through_a_var_column(vocab):
    # var_names are barcodes-like junk; the ids live in a column, with one missing entry.
    column = IDS[:30] + [None] + IDS[30:60]
    var = pd.DataFrame({"gene_ids": column}, index=[f"feat{i}" for i in range(61)])
    with pytest.raises(ValueError, match="--gene-key.*'gene_ids'"):
        match_dataset_genes(vocab, var)  # var_names match nothing: the error points to the column
    match = match_dataset_genes(vocab, var, gene_key="gene_ids")
    assert match.gene_source == "var['gene_ids']" and match.n_matched == 60
    assert match.tokens[30] == -1
    np.testing.assert_array_equal(np.delete(match.tokens, 30), np.arange(3, 63))
    with pytest.raises(ValueError, match=r"gene key 'symbol' is not a var column; var columns: \['gene_ids'\]"):
        match_dataset_genes(vocab, var, gene_key="symbol")


def test_versioned_ids_match_unversioned_vocab(vocab):
    labels = [f"{x}.{i % 7 + 1}" for i, x in enumerate(IDS[:80])]
    match = match_dataset_genes(vocab, pd.DataFrame(index=labels))
    np.testing.assert_array_equal(match.tokens, np.arange(3, 83))


def test_a_token_goes_to_one_dataset_gene_only(vocab):
    labels = [IDS[5], f"{IDS[5]}.2", SYMBOLS[5], IDS[6]]  # three spellings of the same gene
    match = match_genes(vocab, labels)
    assert match.tokens.tolist() == [8, -1, -1, 9] and match.n_matched == 2


def test_threshold_error_names_both_numbers(vocab):
    labels = IDS[:3] + [f"Gm{i}" for i in range(500)]  # mouse-like symbols: 3 of 200 vocab genes
    var = pd.DataFrame({"symbol": labels, "gene_ids": labels}, index=labels)
    with pytest.raises(ValueError) as err:
        match_dataset_genes(vocab, var, min_vocab_fraction=0.05, where="data.h5ad")
    msg = str(err.value)
    assert msg.startswith("data.h5ad: only 3 of the model's 200 vocab genes (1.50%)")
    assert "dataset's 503 genes" in msg and "minimum is 5.00%" in msg
    assert "--gene-key" in msg and "['symbol', 'gene_ids']" in msg
    # The same dataset passes a threshold it clears; the default is the documented one.
    assert match_dataset_genes(vocab, var, min_vocab_fraction=0.015).n_matched == 3
    assert DEFAULT_MIN_VOCAB_FRACTION == 0.01
    with pytest.raises(ValueError, match=r"min_vocab_fraction must be in \[0, 1\]"):
        match_dataset_genes(vocab, var, min_vocab_fraction=1.5)


def test_zero_matches_are_refused_even_at_threshold_zero(vocab):
    match = match_genes(vocab, ["a", "b"], "var_names")
    with pytest.raises(ValueError, match="only 0 of the model's 200"):
        check_vocab_coverage(match, 0.0, "x")


def test_gene_labels_default_to_var_names():
    var = pd.DataFrame({"sym": ["A", np.nan]}, index=["i1", "i2"])
    assert gene_labels(var, None, "x") == (["i1", "i2"], "var_names")
    assert gene_labels(var, "sym", "x") == (["A", ""], "var['sym']")


def test_cells_without_a_matched_gene_are_named(vocab):
    import scipy.sparse as sp

    labels = IDS[:10] + ["UNKNOWN1", "UNKNOWN2"]
    tokens = match_genes(vocab, labels).tokens
    dense = np.zeros((9, 12), np.float32)
    dense[0, 3] = 1
    dense[1, 10] = 5  # only an unmatched gene: empty for the model
    dense[2, [2, 11]] = [0.5, 2]
    dense[4:, 0] = 1
    coo = sp.coo_matrix(dense)  # plus an explicit stored zero (cell3, gene 4): not expression
    x = sp.csr_matrix((np.append(coo.data, 0), (np.append(coo.row, 3), np.append(coo.col, 4))), shape=dense.shape)
    assert x.nnz == coo.nnz + 1
    names = [f"cell{i}" for i in range(9)]
    per_cell = matched_genes_per_cell(x, tokens, names, labels, "d.h5ad")
    assert per_cell.tolist() == [1, 0, 1, 0, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(per_cell, matched_genes_per_cell(dense, tokens, names, labels, "d.h5ad"))
    with pytest.raises(ValueError, match=r"d.h5ad: 2 of 9 cells have no expressed gene in the model's vocab: "
                                         r"'cell1', 'cell3'\. Remove them"):
        check_no_empty_cells(per_cell, names, "d.h5ad")
    many = np.zeros(8, np.int64)
    with pytest.raises(ValueError, match=r"8 of 8 cells .*'c0', 'c1', 'c2', 'c3', 'c4' and 3 more"):
        check_no_empty_cells(many, [f"c{i}" for i in range(8)], "d")


@pytest.mark.parametrize("bad, what", [(-1.0, "is negative"), (np.nan, "is not finite"), (np.inf, "is not finite")])
def test_bad_values_name_the_cell_and_gene(vocab, bad, what):
    labels = IDS[:4] + ["UNKNOWN"]
    tokens = match_genes(vocab, labels).tokens
    x = np.ones((3, 5), np.float32)
    x[2, 4] = bad  # on a gene outside the vocab: still a sign of a scaled or broken matrix
    with pytest.raises(ValueError, match=rf"cell 'c2' \(row 2\), gene 'UNKNOWN': value .*{what}"):
        matched_genes_per_cell(x, tokens, ["c0", "c1", "c2"], labels, "d.h5ad", chunk_cells=2)
