"""Deterministic per-cell quantile binning (paper 2.1, B = n_bins), vectorised over CSR chunks.

The rule (BINNING_RULE, recorded in every manifest). For one cell, over ALL its non-zero values x:
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))        # numpy's default 'linear' method
    left  = np.digitize(x, edges)                                 # edges[i-1] <= x <  edges[i]
    right = np.digitize(x, edges, right=True)                     # edges[i-1] <  x <= edges[i]
    bin   = right + (left - right + 1) // 2
scGPT (preprocess.py::binning) instead draws ceil(left - U * (left - right)) with an unseeded RNG,
i.e. uniformly among right+1..left when x is tied to edges. We take the middle of that range, so we
equal scGPT exactly whenever left - right <= 1 (x not tied to an edge) and are reproducible
otherwise. Bins land in 1..n_bins-1; zeros are not stored and so never binned.

`bin_csr` computes the same numbers as `bin_cell_reference` bit for bit, without a Python loop
over cells: one sort of (row, value) keys, the quantile edges with numpy's own interpolation
arithmetic, and the digitize counts from ranks within each row.
"""
from __future__ import annotations

import numpy as np

BINNING_RULE = "quantile-linear/digitize-median-of-ties/v1"


def check_n_bins(n_bins: int) -> None:
    if not 3 <= int(n_bins) <= 256:
        raise ValueError(f"n_bins must be in 3..256 (bins are stored as uint8), got {n_bins}")


def bin_cell_reference(values: np.ndarray, n_bins: int) -> np.ndarray:
    """The rule, one cell at a time, in plain numpy: the readable ground truth."""
    check_n_bins(n_bins)
    x = np.asarray(values, dtype=np.float32)
    if x.size == 0:
        return np.zeros(0, dtype=np.uint8)
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    return (right + (left - right + 1) // 2).astype(np.uint8)


def bin_csr_reference(indptr: np.ndarray, values: np.ndarray, n_bins: int) -> np.ndarray:
    """Naive per-cell loop over a CSR chunk (the benchmark's baseline)."""
    out = np.zeros(len(values), dtype=np.uint8)
    for r in range(len(indptr) - 1):
        a, b = indptr[r], indptr[r + 1]
        out[a:b] = bin_cell_reference(values[a:b], n_bins)
    return out


ROW_SORT_GROUP = 64


def _row_sort_order_uint16(indptr: np.ndarray, lengths: np.ndarray, v16: np.ndarray) -> np.ndarray:
    """Stable within-row sort order for uint16 values: groups of consecutive rows are padded into
    a matrix (pad 65535 sorts after any real value, stability keeps real 65535s first) and sorted
    along rows, where numpy uses a radix sort: ~2x faster than one argsort of int64 (row, value) keys."""
    order = np.empty(len(v16), dtype=np.int64)
    for g0 in range(0, len(lengths), ROW_SORT_GROUP):
        g1 = min(g0 + ROW_SORT_GROUP, len(lengths))
        lens = lengths[g0:g1]
        width = int(lens.max())
        if width == 0:
            continue
        a, b = indptr[g0], indptr[g1]
        inside = np.arange(width) < lens[:, None]
        padded = np.full((g1 - g0, width), 65535, dtype=np.uint16)
        padded[inside] = v16[a:b]
        local = np.argsort(padded, axis=1, kind="stable")
        order[a:b] = local[inside] + np.repeat(indptr[g0:g1], lens)
    return order


def bin_csr(indptr: np.ndarray, values: np.ndarray, n_bins: int, check: bool = True) -> np.ndarray:
    """Bins (uint8, aligned with `values`) for every row of a CSR chunk; values must be > 0 and finite.

    Work per element is one sort and a few linear passes; everything else is per run of equal
    values (integer counts have few distinct values per cell) or per edge."""
    check_n_bins(n_bins)
    indptr = np.asarray(indptr, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=np.float32)
    nnz = len(values)
    if nnz == 0:
        return np.zeros(0, dtype=np.uint8)
    if check and not (np.isfinite(values).all() and (values > 0).all()):
        bad = int(np.flatnonzero(~(np.isfinite(values) & (values > 0)))[0])
        row = int(np.searchsorted(indptr, bad, side="right") - 1)
        raise ValueError(f"bin_csr: row {row} has a non-positive or non-finite value {values[bad]!r}")
    lengths = np.diff(indptr)
    keep = lengths > 0
    starts = indptr[:-1][keep]
    n = lengths[keep]
    n_edges = n_bins - 1
    v16 = values.astype(np.uint16)
    if np.array_equal(v16, values):
        order = _row_sort_order_uint16(indptr, lengths, v16)  # integer counts: per-row radix sorts
    else:
        # Positive float32 bit patterns sort like the floats, so one int64 key orders (row, value).
        key = np.repeat(np.arange(len(lengths), dtype=np.int64) << 32, lengths)
        key |= values.view(np.uint32)
        order = np.argsort(key, kind="stable")
    s = values[order]
    new_run = np.empty(nnz, dtype=bool)
    new_run[0] = True
    np.not_equal(s[1:], s[:-1], out=new_run[1:])
    new_run[starts] = True  # runs of equal values never cross rows
    run_starts = np.flatnonzero(new_run)
    n_runs = len(run_starts)

    q = np.linspace(0, 1, n_edges)
    # numpy's 'linear' quantile: virtual index (n-1)*q, lerp between floor and floor+1, and the
    # last value when the index reaches n-1. Same dtypes as numpy (float32 data, float64 q).
    virtual = (n - 1)[:, None] * q[None, :]
    prev = np.floor(virtual)
    at_end = virtual >= (n - 1)[:, None]
    prev_idx = np.where(at_end, (n - 1)[:, None], prev.astype(np.int64))
    next_idx = np.where(at_end, prev_idx, prev_idx + 1)
    gamma = np.where(at_end, 0.0, virtual - prev)
    lo = starts[:, None] + prev_idx
    hi = starts[:, None] + next_idx
    a, b = values[order[lo]], values[order[hi]]
    diff = b - a
    edges = a + diff * gamma
    upper = gamma >= 0.5
    edges[upper] = (b - diff * (1 - gamma))[upper]

    # An edge e lies in [s[lo], s[hi]] (s = the row sorted). "Values < e" ends, and "values <= e"
    # ends, at run boundaries: the run of s[lo] (if e equals it), of s[hi] (if e equals it), or
    # between lo and hi. Express both as run indices.
    run_lo = np.searchsorted(run_starts, lo, side="right") - 1
    run_hi = np.searchsorted(run_starts, hi, side="right") - 1
    eq_lo = edges == a
    eq_hi = ~eq_lo & (edges == b)
    lt_run = np.where(eq_lo, run_lo, np.where(eq_hi, run_hi, run_lo + 1))  # first run with value >= e
    le_run = np.where(eq_lo, run_lo + 1, np.where(eq_hi, run_hi + 1, run_lo + 1))  # first run with value > e
    # left(run R) = #edges with lt_run <= R ; right(run R) = #edges with le_run <= R, counted within
    # the row. lt_run always lies inside the row: subtract n_edges per earlier row. le_run may be the
    # next row's first run (e = row max): such counts spill over and are removed with a baseline.
    row_of_run = np.searchsorted(starts, run_starts, side="right") - 1  # index among non-empty rows
    first_run = np.searchsorted(row_of_run, np.arange(len(starts)), side="left")
    left = np.cumsum(np.bincount(lt_run.ravel(), minlength=n_runs)[:n_runs]) - n_edges * row_of_run
    right_hits = np.bincount(le_run.ravel(), minlength=n_runs + 1)[:n_runs]
    right_cum = np.cumsum(right_hits)
    right = right_cum - right_cum[first_run][row_of_run]
    run_bins = (right + (left - right + 1) // 2).astype(np.uint8)
    run_len = np.diff(np.append(run_starts, nnz))
    out = np.empty(nnz, dtype=np.uint8)
    out[order] = np.repeat(run_bins, run_len)
    return out
