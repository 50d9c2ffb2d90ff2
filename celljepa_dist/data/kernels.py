"""Compiled per-cell kernels for shard building: COO -> CSR, cell preparation, quantile binning.

numba-compiled (cached on disk after the first call) and `nogil`, so they run on one core while
TileDB's reader threads and the shard writer use the other. Each kernel is a plain loop over
cells doing what the numpy version did in a dozen whole-array passes, in one or two passes and
without temporaries. Errors come back as codes plus the offending entry's index; the Python
callers turn them into messages naming the cell, gene and file.

The binning arithmetic is numpy's, operation for operation and dtype for dtype (float32 values,
float64 quantile positions and edges), so the bins equal `binning.bin_cell_reference` bit for bit
(tests/test_binning.py checks it on tie-heavy, huge, tiny-range, around-256, mixed integer and
fractional, and continuous values).
"""
from __future__ import annotations

import numba as nb
import numpy as np

SMALL_COUNT = 256  # integer values below this are binned through a histogram instead of a sort

OK, NOT_FINITE, NEGATIVE, NOT_INTEGER, NOT_POSITIVE, DUPLICATE = 0, 1, 2, 3, 4, 5


@nb.njit(cache=True, nogil=True)
def _quantile_edges(s, n, q, edges):
    """numpy.quantile(s[:n], q) for ascending float32 s, method 'linear', into float64 edges."""
    for k in range(len(q)):
        virtual = (n - 1) * q[k]
        if virtual >= n - 1:  # numpy: both neighbours are the last value, gamma 0
            edges[k] = s[n - 1]
            continue
        prev = np.floor(virtual)
        gamma = virtual - prev
        i = np.int64(prev)
        a, b = s[i], s[i + 1]
        diff = b - a  # float32, as numpy subtracts the float32 data
        if gamma >= 0.5:
            edges[k] = b - diff * (1.0 - gamma)
        else:
            edges[k] = a + diff * gamma


@nb.njit(cache=True, nogil=True)
def _bin_of(left, right):
    return np.uint8(right + (left - right + 1) // 2)


@nb.njit(cache=True, nogil=True)
def _bin_row(x, out, q, edges, hist, lut, scratch, large):
    """Bins of one cell's values x (all > 0, finite) into out.

    Integer counts (the Census' raw layer): those below SMALL_COUNT are counting-sorted through
    hist and binned once per distinct value (two pointers over the non-decreasing edges); the few
    larger ones are sorted on their own and binned by binary search. Any other value: one sort.
    hist (int64[SMALL_COUNT]) is zero on entry and on exit; lut is uint8[SMALL_COUNT]; scratch
    and large hold at least len(x) float32."""
    n = len(x)
    if n == 0:
        return
    n_edges = len(q)
    integer = True
    n_large = 0
    for i in range(n):
        v = x[i]
        if v != np.floor(v):
            integer = False
        elif v < SMALL_COUNT:
            hist[np.int64(v)] += 1
        else:
            large[n_large] = v
            n_large += 1
    if not integer:
        hist[:] = 0
        s = np.sort(x)
        _quantile_edges(s, n, q, edges)
        for i in range(n):
            v = np.float64(x[i])
            out[i] = _bin_of(np.searchsorted(edges, v, side="right"), np.searchsorted(edges, v, side="left"))
        return
    # The sorted row: each small value repeated hist[v] times, then the sorted large ones.
    c = 0
    for v in range(1, SMALL_COUNT):
        for _ in range(hist[v]):
            scratch[c] = v
            c += 1
    if n_large:
        scratch[c:n] = np.sort(large[:n_large])
    _quantile_edges(scratch, n, q, edges)
    # left = #edges <= v (np.digitize), right = #edges < v (np.digitize right=True).
    le = 0
    lt = 0
    for v in range(1, SMALL_COUNT):
        if hist[v] == 0:
            continue
        while le < n_edges and edges[le] <= v:
            le += 1
        while lt < n_edges and edges[lt] < v:
            lt += 1
        lut[v] = _bin_of(le, lt)
        hist[v] = 0
    for i in range(n):
        v = x[i]
        if v < SMALL_COUNT:
            out[i] = lut[np.int64(v)]
        else:
            w = np.float64(v)
            out[i] = _bin_of(np.searchsorted(edges, w, side="right"), np.searchsorted(edges, w, side="left"))


@nb.njit(cache=True, nogil=True)
def _bin_workspace(indptr, n_edges):
    """Scratch buffers for _bin_row, allocated once per chunk: (edges, hist, lut, scratch, large)."""
    max_len = 0
    for r in range(len(indptr) - 1):
        max_len = max(max_len, indptr[r + 1] - indptr[r])
    return (np.empty(n_edges, np.float64), np.zeros(SMALL_COUNT, np.int64), np.empty(SMALL_COUNT, np.uint8),
            np.empty(max_len, np.float32), np.empty(max_len, np.float32))


@nb.njit(cache=True, nogil=True)
def bin_rows(indptr, values, q, out):
    """Bin every row of a CSR chunk; returns (OK, -1) or (error code, entry index)."""
    for i in range(len(values)):
        v = values[i]
        if not np.isfinite(v):
            return NOT_FINITE, i
        if v <= 0:
            return NOT_POSITIVE, i
    edges, hist, lut, scratch, large = _bin_workspace(indptr, len(q))
    for r in range(len(indptr) - 1):
        a, b = indptr[r], indptr[r + 1]
        _bin_row(values[a:b], out[a:b], q, edges, hist, lut, scratch, large)
    return OK, -1


@nb.njit(cache=True, nogil=True)
def _sort_segment(keys, vals, a, b):
    """Sort keys[a:b] ascending, carrying vals along; True if a key repeats."""
    order = np.argsort(keys[a:b], kind="mergesort")
    k = keys[a:b][order]
    v = vals[a:b][order]
    keys[a:b] = k
    vals[a:b] = v
    for i in range(1, len(k)):
        if k[i] == k[i - 1]:
            return True
    return False


@nb.njit(cache=True, nogil=True)
def _rows_of(joinids, position_of, dim0):
    """Output row of each entry (-1: not wanted): through the lookup table position_of (indexed
    by joinid - joinids[0]) or, if it is empty, by binary search. Entries of one row come in
    runs, so each run is looked up once."""
    rows = np.empty(len(dim0), np.int32)
    lo = joinids[0]
    span = len(position_of)
    prev = -1
    p = -1
    for i in range(len(dim0)):
        j = dim0[i]
        if j != prev:
            prev = j
            p = -1
            if span:
                if lo <= j < lo + span:
                    p = position_of[j - lo]
            else:
                k = np.searchsorted(joinids, j)
                if k < len(joinids) and joinids[k] == j:
                    p = k
        rows[i] = p
    return rows


@nb.njit(cache=True, nogil=True)
def coo_to_csr(joinids, position_of, dim0, dim1, data):
    """Entries (dim0 row joinid, dim1 gene, data) in any order -> CSR over the sorted unique
    `joinids`, genes (int32) ascending per row; rows not in joinids are dropped. position_of maps
    joinid - joinids[0] to the output row (-1: not wanted); if empty, rows are binary-searched.
    Returns (indptr, genes, values, code, joinid, gene): code DUPLICATE names a repeated entry.

    Stable scatter by row: on the Census layout (row-major within 2048 x 2048 tiles, tiles in
    order) each row's genes then ascend already; a row that does not is sorted on its own."""
    n_rows = len(joinids)
    counts = np.zeros(n_rows + 1, np.int64)
    if n_rows == 0:
        return counts, np.empty(0, np.int32), np.empty(0, np.float32), OK, np.int64(-1), np.int64(-1)
    rows = _rows_of(joinids, position_of, dim0)
    for i in range(len(rows)):
        counts[rows[i] + 1] += 1  # unwanted entries land in counts[0]
    counts[0] = 0
    indptr = np.cumsum(counts)
    cursor = indptr[:-1].copy()
    genes = np.empty(indptr[-1], np.int32)
    values = np.empty(indptr[-1], np.float32)
    for i in range(len(rows)):
        p = rows[i]
        if p >= 0:
            c = cursor[p]
            genes[c] = dim1[i]
            values[c] = data[i]
            cursor[p] = c + 1
    for r in range(n_rows):
        a, b = indptr[r], indptr[r + 1]
        for c in range(a + 1, b):
            if genes[c] <= genes[c - 1]:
                if _sort_segment(genes, values, a, b):
                    for d in range(a + 1, b):
                        if genes[d] == genes[d - 1]:
                            return indptr, genes, values, DUPLICATE, joinids[r], np.int64(genes[d])
                break
    return indptr, genes, values, OK, np.int64(-1), np.int64(-1)


@nb.njit(cache=True, nogil=True)
def prepare_rows(indptr, genes, values, tokens, q, raw_check):
    """One chunk of cells -> the shard's columns, in one pass per cell: check each value (finite,
    >= 0, an integer if raw_check), drop zeros and genes without a token, order by token, bin.

    Returns (offsets, tok, vals, bins, kept_rows, n_zeros, n_unmatched, code, entry_index); the
    arrays are sized for the worst case and valid up to offsets[-1] / len(offsets) - 1."""
    n_rows = len(indptr) - 1
    nnz = len(values)
    tok = np.empty(nnz, np.int32)
    vals = np.empty(nnz, np.float32)
    bins = np.empty(nnz, np.uint8)
    offsets = np.zeros(n_rows + 1, np.int64)
    kept = np.empty(n_rows, np.int64)
    edges, hist, lut, scratch, large = _bin_workspace(indptr, len(q))
    n_kept = 0
    n_zeros = 0
    n_unmatched = 0
    c = 0
    for r in range(n_rows):
        start = c
        ascending = True
        for i in range(indptr[r], indptr[r + 1]):
            x = values[i]
            if not np.isfinite(x):
                return offsets[:1], tok, vals, bins, kept[:0], n_zeros, n_unmatched, NOT_FINITE, i
            if x < 0:
                return offsets[:1], tok, vals, bins, kept[:0], n_zeros, n_unmatched, NEGATIVE, i
            if raw_check and x != np.floor(x):
                return offsets[:1], tok, vals, bins, kept[:0], n_zeros, n_unmatched, NOT_INTEGER, i
            if x == 0:
                n_zeros += 1
                continue
            t = tokens[genes[i]]
            if t < 0:
                n_unmatched += 1
                continue
            if c > start and t <= tok[c - 1]:
                ascending = False
            tok[c] = t
            vals[c] = x
            c += 1
        if c == start:
            continue  # a cell with no expressed gene in the vocab: skipped (counted by the caller)
        if not ascending:  # the vocab orders genes differently from the source
            _sort_segment(tok, vals, start, c)
        _bin_row(vals[start:c], bins[start:c], q, edges, hist, lut, scratch, large)
        kept[n_kept] = r
        n_kept += 1
        offsets[n_kept] = c
    return offsets[:n_kept + 1], tok, vals, bins, kept[:n_kept], n_zeros, n_unmatched, OK, -1


def quantile_positions(n_bins: int) -> np.ndarray:
    """The q of np.quantile(x, q) for scGPT's n_bins: n_bins - 1 edges from 0 to 1."""
    return np.linspace(0, 1, n_bins - 1)
