"""Deterministic per-cell quantile binning (paper 2.1, B = n_bins), compiled over CSR chunks.

The rule (BINNING_RULE, recorded in every manifest). For one cell, over ALL its non-zero values x:
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))        # numpy's default 'linear' method
    left  = np.digitize(x, edges)                                 # edges[i-1] <= x <  edges[i]
    right = np.digitize(x, edges, right=True)                     # edges[i-1] <  x <= edges[i]
    bin   = right + (left - right + 1) // 2
scGPT (preprocess.py::binning) instead draws ceil(left - U * (left - right)) with an unseeded RNG,
i.e. uniformly among right+1..left when x is tied to edges. We take the middle of that range, so we
equal scGPT exactly whenever left - right <= 1 (x not tied to an edge) and are reproducible
otherwise. Bins land in 1..n_bins-1; zeros are not stored and so never binned.

`bin_csr` computes the same numbers as `bin_cell_reference` bit for bit in compiled code
(kernels.py): integer counts below 256 are counting-sorted through a per-cell histogram and
binned once per distinct value; other values are sorted per cell. Edges use numpy's own
interpolation arithmetic and dtypes.
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


def bin_csr(indptr: np.ndarray, values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bins (uint8, aligned with `values`) for every row of a CSR chunk; values must be > 0 and
    finite. Compiled (kernels.bin_rows): a histogram per cell for integer counts below 256, a sort
    per cell otherwise; bit-equal to bin_cell_reference."""
    from .kernels import NOT_FINITE, OK, bin_rows, quantile_positions

    check_n_bins(n_bins)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=np.float32)
    out = np.empty(len(values), dtype=np.uint8)
    code, bad = bin_rows(indptr, values, quantile_positions(n_bins), out)
    if code != OK:
        row = int(np.searchsorted(indptr, bad, side="right") - 1)
        what = "non-finite" if code == NOT_FINITE else "non-positive"
        raise ValueError(f"bin_csr: row {row} has a {what} value {values[bad]!r}")
    return out
