import numpy as np
import pytest

from celljepa_dist.data.binning import bin_cell_reference, bin_csr


def random_csr(rng, n_rows, max_len, kind):
    lens = rng.integers(0, max_len, size=n_rows)
    lens[rng.integers(n_rows)] = 1  # a single-gene cell: every edge equals its value
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    nnz = int(indptr[-1])
    if kind == "counts":  # integer counts: heavy ties, the case scGPT's RNG is for
        values = rng.negative_binomial(1, 0.3, size=nnz).astype(np.float32) + 1
    elif kind == "huge_counts":  # integers beyond uint16: the general (int64 key) sort path
        values = rng.integers(1, 200_000, size=nnz).astype(np.float32)
    elif kind == "tiny_range":
        values = rng.integers(1, 4, size=nnz).astype(np.float32)
    elif kind == "around_256":  # the compiled kernel counting-sorts small integers, sorts the rest
        values = rng.integers(200, 320, size=nnz).astype(np.float32)
    elif kind == "mixed":  # integers with a few fractional values in some rows: the float path
        values = rng.integers(1, 300, size=nnz).astype(np.float32)
        values[rng.random(nnz) < 0.01] += 0.5
    else:  # continuous, no ties
        values = rng.lognormal(0, 2, size=nnz).astype(np.float32)
    return indptr, values


def scgpt_bin_cell(values, n_bins, rng):
    """scGPT preprocess.py::binning + _digitize for one row of non-zero values (its formula)."""
    bins = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, bins)
    right = np.digitize(values, bins, right=True)
    rands = rng.random(len(values))
    return np.ceil(rands * (right - left) + left).astype(np.int64)


@pytest.mark.parametrize("kind", ["counts", "tiny_range", "huge_counts", "continuous", "around_256", "mixed"])
@pytest.mark.parametrize("n_bins", [3, 11, 51, 256])
def test_compiled_equals_per_cell_rule(kind, n_bins):
    rng = np.random.default_rng(n_bins)
    indptr, values = random_csr(rng, 40, 400, kind)
    fast = bin_csr(indptr, values, n_bins)
    for r in range(len(indptr) - 1):
        a, b = indptr[r], indptr[r + 1]
        np.testing.assert_array_equal(fast[a:b], bin_cell_reference(values[a:b], n_bins), err_msg=f"row {r}")
    if len(values):
        assert fast.min() >= 1 and fast.max() <= n_bins - 1


def test_equals_scgpt_formula_without_ties():
    rng = np.random.default_rng(7)
    for _ in range(20):
        x = rng.permutation(rng.lognormal(0, 2, size=int(rng.integers(60, 500))).astype(np.float32))
        if np.unique(x).size != x.size:
            continue
        # scGPT's random draw only matters when a value equals two or more edges; with distinct
        # values every edge is hit by at most one value, so left - right <= 1 everywhere.
        ours = bin_csr(np.array([0, len(x)]), x, 51)
        theirs = scgpt_bin_cell(x, 51, rng)
        np.testing.assert_array_equal(ours, theirs)


def test_ties_take_the_middle_of_scgpts_range():
    rng = np.random.default_rng(3)
    x = rng.integers(1, 5, size=200).astype(np.float32)
    ours = bin_cell_reference(x, 51).astype(np.int64)
    edges = np.quantile(x, np.linspace(0, 1, 50))
    left, right = np.digitize(x, edges), np.digitize(x, edges, right=True)
    assert ((left - right) > 1).any(), "test data must have values tied to several edges"
    assert ((ours >= np.minimum(right + 1, left)) & (ours <= left)).all()
    draws = np.stack([scgpt_bin_cell(x, 51, np.random.default_rng(s)) for s in range(200)])
    # scGPT's draws spread over the range; ours is its middle, stable across calls.
    assert np.abs(draws.mean(0) - ours).max() < 1.5
    np.testing.assert_array_equal(bin_cell_reference(x, 51), bin_cell_reference(x, 51))


def test_empty_rows_and_empty_chunk():
    indptr = np.array([0, 0, 3, 3, 5])
    values = np.array([1, 2, 3, 5, 5], np.float32)
    out = bin_csr(indptr, values, 51)
    np.testing.assert_array_equal(out[:3], bin_cell_reference(values[:3], 51))
    np.testing.assert_array_equal(out[3:], bin_cell_reference(values[3:], 51))
    assert bin_csr(np.array([0, 0]), np.zeros(0, np.float32), 51).shape == (0,)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_bad_values_name_the_row(bad):
    values = np.array([1, 2, 3, bad, 4], np.float32)
    with pytest.raises(ValueError, match="row 1"):
        bin_csr(np.array([0, 2, 5]), values, 51)


def test_n_bins_out_of_range():
    with pytest.raises(ValueError, match="n_bins"):
        bin_csr(np.array([0, 1]), np.ones(1, np.float32), 300)
