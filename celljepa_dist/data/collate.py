"""Per-cell transforms (paper 2.1, 2.2.1): subsample, prepend <cls>, mask, pad -> batch arrays.

Randomness without per-cell RNG objects (too slow at 25k cells/s): every expressed gene g of
cell c gets a 32-bit key `fmix32(g * PHI32 ^ cell_key(seed, epoch, joinid))`. The map g -> key
is a bijection for a fixed cell, so keys never tie. Per cell, with n expressed genes:

- kept   = the min(n, max_genes) genes with the smallest keys (a uniform random subset);
- masked = the ceil(r * kept) smallest keys among the kept (given the kept set, the order of
  i.i.d. keys inside it is a uniform permutation, so this is a uniform subset of the kept genes,
  as scGPT's `random_mask_value`, but of exact size). r = 0 masks nothing; <cls> is never masked.

Both depend only on (seed, epoch, joinid, the cell's genes): a cell's tokens do not depend on
the batch it lands in, the worker that builds it, or the number of workers.

Token order inside a cell: <cls>, then the kept genes in vocab order; with `known_first` <cls>,
the known genes, then the masked genes (each group in vocab order), which lets attention kernels
skip whole blocks. The model has no positional encoding, so both orders mean the same cell.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from celljepa_dist.tokens import CLS_ID, CLS_VALUE, MASK_VALUE, PAD_ID, PAD_VALUE

_PHI64 = 0x9E3779B97F4A7C15
_PHI32 = 0x9E3779B1
_TAG = 0xCE11  # keeps these keys apart from any other use of splitmix64 on the same seed


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(_PHI64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def cell_keys(seed: int, epoch: int, joinids: np.ndarray) -> np.ndarray:
    """32-bit per-cell key, a pure function of (seed, epoch, joinid)."""
    with np.errstate(over="ignore"):
        base = splitmix64(splitmix64(np.array([(seed ^ _TAG) & (2**64 - 1)], dtype=np.uint64)) ^ np.uint64(epoch))
        k = splitmix64(base ^ np.asarray(joinids, dtype=np.int64).astype(np.uint64))
    return (k ^ (k >> np.uint64(32))).astype(np.uint32)


def gene_keys(genes: np.ndarray, cell_key_per_gene: np.ndarray) -> np.ndarray:
    """murmur3's fmix32 of (gene * PHI32 ^ cell key): a bijection of the gene for a fixed cell."""
    h = genes.astype(np.uint32) * np.uint32(_PHI32)
    h ^= cell_key_per_gene
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def num_masked(n_kept: np.ndarray, mask_ratio: float) -> np.ndarray:
    """ceil(r * n) per cell; r * n is rounded to 1e-6 first so 0.15 * 600 gives 90, not 91."""
    if mask_ratio == 0:
        return np.zeros_like(n_kept)
    return np.ceil(np.round(n_kept * mask_ratio, 6)).astype(n_kept.dtype)


_BUCKET_BITS = 8  # 256 buckets of the 32-bit key per cell (a few keys each for ~1000-gene cells)


def kth_smallest(keys: np.ndarray, counts: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Per row (rows are consecutive runs of `counts` keys), the kth[r]-th smallest key (1-based,
    1 <= kth[r] <= counts[r])."""
    return kth_smallest_many(keys, counts, [kth])[0]


def kth_smallest_many(keys: np.ndarray, counts: np.ndarray, kths: list[np.ndarray]) -> list[np.ndarray]:
    """kth_smallest for several rank arrays at once, sharing the per-row histogram.

    Vectorised selection without a per-row loop or a full sort: a per-row histogram of the keys'
    top bits finds the bucket holding the answer, and only that bucket's few keys are sorted.
    The answer is exact whatever the number of buckets; it only sets how many keys get sorted.
    (np.repeat instead of fancy indexing by row: it streams, where a gather does not.)
    """
    n_rows, n_buckets = len(counts), 1 << _BUCKET_BITS
    bucket = (keys >> np.uint32(32 - _BUCKET_BITS)).astype(np.int32)
    slot = bucket + np.repeat(np.arange(0, n_rows * n_buckets, n_buckets, dtype=np.int32), counts)
    cum = np.cumsum(np.bincount(slot, minlength=n_rows * n_buckets).reshape(n_rows, n_buckets), axis=1)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = np.arange(n_rows)
    out = []
    for kth in kths:
        target = (cum < kth[:, None]).sum(axis=1)  # first bucket whose running count reaches kth
        before = np.where(target > 0, cum[rows, np.maximum(target - 1, 0)], 0)
        cand = np.flatnonzero(bucket == np.repeat(target.astype(np.int32), counts))
        cand_row = np.searchsorted(starts, cand, side="right") - 1
        cand = cand[np.lexsort((keys[cand], cand_row))]  # by row, then key
        first = np.searchsorted(np.sort(cand_row), rows)
        out.append(keys[cand[first + (kth - before) - 1]])
    return out


def select_tokens(offsets, genes, joinids, *, seed, epoch, max_genes, mask_ratio):
    """Which genes each cell keeps and masks.

    Returns (kept, masked, n_kept, n_masked): bool arrays over the flat gene arrays and per-cell
    counts. Keys are unique within a cell, so "key <= the k-th smallest key" selects exactly k genes.
    """
    n = np.diff(offsets)
    n_kept = np.minimum(n, max_genes)
    n_masked = num_masked(n_kept, mask_ratio)
    nnz = int(offsets[-1])
    if n_masked.sum() == 0 and (n_kept == n).all():  # nothing random to do
        return np.ones(nnz, bool), np.zeros(nnz, bool), n_kept, n_masked
    has = np.flatnonzero(n > 0)  # empty cells have nothing to select
    counts = n[has]
    keys = gene_keys(genes, np.repeat(cell_keys(seed, epoch, np.asarray(joinids)[has]), counts))
    top = np.uint32(np.iinfo(np.uint32).max)
    m = n_masked[has]
    kths = [np.maximum(n_kept[has], 1)] + ([np.maximum(m, 1)] if m.any() else [])
    thresholds = kth_smallest_many(keys, counts, kths)
    keep_thr = np.where(n_kept[has] < counts, thresholds[0], top)
    kept = keys <= np.repeat(keep_thr.astype(np.uint32), counts)
    if m.any():
        mask_thr = thresholds[1]
        masked = (keys <= np.repeat(mask_thr, counts)) & np.repeat(m > 0, counts)
    else:
        masked = np.zeros(nnz, bool)
    return kept, masked, n_kept, n_masked


def collate_cells_packed(
    offsets: np.ndarray,
    genes: np.ndarray,
    bins: np.ndarray,
    joinids: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    seed: int,
    epoch: int,
    max_genes: int = 600,
    mask_ratio: float = 0.15,
    known_first: bool = False,
    alloc=None,
) -> tuple[np.ndarray, list, dict[str, np.ndarray]]:
    """CSR cells (vocab-ordered genes, uint8 bins) -> (buffer, layout, batch dict of views into it).

    The batch dict is that of docs/ARCHITECTURE.md; `collate_cells` returns just the dict.
    `alloc(nbytes) -> uint8 array` provides the buffer (e.g. in shared memory); default np.empty.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    joinids = np.asarray(joinids, dtype=np.int64)
    n_cells = len(offsets) - 1
    kept, masked, n_kept, n_masked = select_tokens(
        offsets, genes, joinids, seed=seed, epoch=epoch, max_genes=max_genes, mask_ratio=mask_ratio
    )
    idx = np.flatnonzero(kept)  # vocab order within each cell, cells in batch order
    is_masked = masked[idx]
    kept_start = np.concatenate([[0], np.cumsum(n_kept)])[:-1]
    width = int(n_kept.max()) + 1 if n_cells else 1
    # flat index of each kept token = row * width + position; (row * width - kept_start) per row
    if known_first:
        row_base = np.repeat(np.arange(n_cells, dtype=np.int64) * width - kept_start, n_kept)
        known = ~is_masked
        known_before = np.cumsum(known) - known  # exclusive prefix counts
        masked_before = np.cumsum(is_masked) - is_masked
        first = np.repeat(kept_start, n_kept)  # index in idx of the row's first kept entry
        known_rank = known_before - known_before[first]
        masked_rank = masked_before - masked_before[first]
        n_known = np.repeat(n_kept - n_masked, n_kept)
        pos = np.where(known, 1 + known_rank, 1 + n_known + masked_rank) + first
        flat = row_base + pos
    else:  # row * width + 1 + (i - kept_start[row]) for the i-th kept token
        flat = np.repeat(np.arange(1, n_cells * width + 1, width, dtype=np.int64) - kept_start, n_kept)
        flat += np.arange(len(idx), dtype=np.int64)

    buffer, layout, out = allocate_batch(n_cells, width, alloc)
    out["gene_ids"].fill(PAD_ID)
    out["gene_ids"][:, 0] = CLS_ID
    out["gene_ids"].reshape(-1)[flat] = genes[idx]
    target = out["target_values"]
    target.fill(PAD_VALUE)
    target[:, 0] = CLS_VALUE
    target.reshape(-1)[flat] = bins[idx]
    out["value_mask"].fill(False)
    masked_flat = flat[is_masked]
    out["value_mask"].reshape(-1)[masked_flat] = True
    np.copyto(out["values"], target)
    out["values"].reshape(-1)[masked_flat] = MASK_VALUE
    out["lengths"][:] = n_kept + 1
    np.greater_equal(np.arange(width)[None, :], out["lengths"][:, None], out=out["padding_mask"])
    out["cell_ids"][:] = joinids
    out["labels"][:] = -1 if labels is None else labels
    return buffer, layout, out


# The batch arrays live in one buffer, so moving a batch between processes is one segment and no
# extra copy (the DataLoader moves every tensor through its own shared-memory file).
BATCH_FIELDS = (("gene_ids", np.int64, 2), ("values", np.float32, 2), ("target_values", np.float32, 2),
                ("value_mask", np.bool_, 2), ("padding_mask", np.bool_, 2), ("lengths", np.int32, 1),
                ("cell_ids", np.int64, 1), ("labels", np.int64, 1))


def allocate_batch(n_cells: int, width: int, alloc=None) -> tuple[np.ndarray, list, dict[str, np.ndarray]]:
    layout, nbytes = _layout(n_cells, width)
    buffer = np.empty(nbytes, dtype=np.uint8) if alloc is None else alloc(nbytes)
    return buffer, list(layout), unpack_arrays(buffer, layout)


@functools.lru_cache(maxsize=256)  # batches repeat a few (n_cells, width) shapes
def _layout(n_cells: int, width: int) -> tuple[tuple, int]:
    layout, offset = [], 0
    for key, dtype, ndim in BATCH_FIELDS:
        shape = (n_cells, width) if ndim == 2 else (n_cells,)
        layout.append((key, np.dtype(dtype).str, shape, offset))
        offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 8) * 8  # 8-byte aligned
    return tuple(layout), offset


def hashable_layout(layout) -> tuple:
    """The layout as nested tuples (pin_memory turns tuples into lists on the way)."""
    return tuple((key, dtype, tuple(shape), int(start)) for key, dtype, shape, start in layout)


@functools.lru_cache(maxsize=256)
def _views(layout: tuple) -> tuple:
    return tuple((key, np.dtype(dtype), shape, start, start + int(np.prod(shape)) * np.dtype(dtype).itemsize)
                 for key, dtype, shape, start in layout)


def unpack_arrays(buffer: np.ndarray, layout: list) -> dict[str, np.ndarray]:
    return {key: buffer[start:stop].view(dt).reshape(shape) for key, dt, shape, start, stop in _views(hashable_layout(layout))}


def collate_cells(*args, **kwargs) -> dict[str, np.ndarray]:
    """CSR cells (vocab-ordered genes, uint8 bins) -> the batch dict of docs/ARCHITECTURE.md."""
    return collate_cells_packed(*args, **kwargs)[2]


def to_tensors(batch: dict[str, np.ndarray], pin_memory: bool = False) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    if pin_memory:
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


def gather_cells(offsets: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ragged gather: rows `cells` of a CSR -> (new offsets, flat indices into the old arrays)."""
    starts = offsets[cells]
    n = offsets[cells + 1] - starts
    new_offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    flat = np.arange(int(new_offsets[-1]), dtype=np.int64) + np.repeat(starts - new_offsets[:-1], n)
    return new_offsets, flat


def check_mask_ratio(mask_ratio: float) -> None:
    if math.isnan(mask_ratio) or not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
