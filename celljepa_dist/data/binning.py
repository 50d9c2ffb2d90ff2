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


def _within_row_cumcount(positions: np.ndarray, starts: np.ndarray, lengths: np.ndarray, nnz: int) -> np.ndarray:
    """For every slot j of every row: how many of `positions` (already global, inside their row) are <= j."""
    hits = np.bincount(positions, minlength=nnz)[:nnz]
    total = np.cumsum(hits)
    before_row = (total - hits)[starts]
    return total - np.repeat(before_row, lengths)


def bin_csr(indptr: np.ndarray, values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bins (uint8, aligned with `values`) for every row of a CSR chunk; values must be > 0 and finite."""
    check_n_bins(n_bins)
    indptr = np.asarray(indptr, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=np.float32)
    nnz = len(values)
    if nnz == 0:
        return np.zeros(0, dtype=np.uint8)
    if not (np.isfinite(values).all() and (values > 0).all()):
        bad = int(np.flatnonzero(~(np.isfinite(values) & (values > 0)))[0])
        row = int(np.searchsorted(indptr, bad, side="right") - 1)
        raise ValueError(f"bin_csr: row {row} has a non-positive or non-finite value {values[bad]!r}")
    lengths = np.diff(indptr)
    n_rows = len(lengths)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
    # Positive float32 bit patterns sort like the floats, so one int64 key orders (row, value).
    key = (rows << 32) | values.view(np.uint32).astype(np.int64)
    order = np.argsort(key, kind="stable")
    s = values[order]

    keep = lengths > 0
    starts = indptr[:-1][keep]
    n = lengths[keep]
    q = np.linspace(0, 1, n_bins - 1)
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
    a, b = s[lo], s[hi]
    diff = b - a
    edges = a + diff * gamma
    upper = gamma >= 0.5
    edges[upper] = (b - diff * (1 - gamma))[upper]

    # Runs of equal values within a row give "how many values < e" and "<= e" for an edge e
    # that lies in [s[lo], s[hi]].
    new_run = np.ones(nnz, dtype=bool)
    new_run[1:] = (s[1:] != s[:-1]) | (rows[1:] != rows[:-1])
    run_starts = np.flatnonzero(new_run)
    run_id = np.cumsum(new_run) - 1
    run_ends = np.append(run_starts[1:], nnz)
    eq_lo = edges == a
    eq_hi = ~eq_lo & (edges == b)
    c_lt = np.where(eq_lo, run_starts[run_id[lo]], np.where(eq_hi, run_starts[run_id[hi]], lo + 1))
    c_le = np.where(eq_lo, run_ends[run_id[lo]], np.where(eq_hi, run_ends[run_id[hi]], lo + 1))

    # left_j = #edges with c_lt <= j ; right_j = #edges with c_le <= j (j = sorted slot in row).
    ends = (starts + n)[:, None]
    left = _within_row_cumcount(c_lt.ravel(), starts, n, nnz)
    in_row = c_le < ends
    right = _within_row_cumcount(c_le[in_row], starts, n, nnz)
    out = np.empty(nnz, dtype=np.uint8)
    out[order] = right + (left - right + 1) // 2
    return out
