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

import math

import numpy as np
import torch

PAD_ID = 0  # docs/ARCHITECTURE.md: special tokens first, <pad> = 0, <cls> = 1
CLS_ID = 1
MASK_VALUE = -1.0
PAD_VALUE = -2.0
CLS_VALUE = 0.0

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


def select_tokens(offsets, genes, joinids, *, seed, epoch, max_genes, mask_ratio):
    """Which genes each cell keeps and masks.

    Returns (kept, masked, n_kept, n_masked): bool arrays over the flat gene arrays and per-cell
    counts. Keys are unique within a cell, so "key <= the k-th smallest key" selects exactly k
    genes; one np.partition per cell finds both thresholds (a full sort is ~5x slower).
    """
    n = np.diff(offsets)
    n_kept = np.minimum(n, max_genes)
    n_masked = num_masked(n_kept, mask_ratio)
    nnz = int(offsets[-1])
    if n_masked.sum() == 0 and (n_kept == n).all():  # nothing random to do
        return np.ones(nnz, bool), np.zeros(nnz, bool), n_kept, n_masked
    row = np.repeat(np.arange(len(n), dtype=np.int64), n)
    keys = gene_keys(genes, cell_keys(seed, epoch, joinids)[row])
    keep_thr = np.full(len(n), np.iinfo(np.uint32).max, dtype=np.uint32)
    mask_thr = np.zeros(len(n), dtype=np.uint32)
    for i in np.flatnonzero((n_kept < n) | (n_masked > 0)):
        k, m = int(n_kept[i]), int(n_masked[i])
        cell = keys[offsets[i] : offsets[i + 1]]
        part = np.partition(cell, [m - 1, k - 1] if m else k - 1)
        if k < len(cell):
            keep_thr[i] = part[k - 1]
        if m:
            mask_thr[i] = part[m - 1]
    kept = keys <= keep_thr[row]
    masked = (keys <= mask_thr[row]) & (n_masked > 0)[row]
    return kept, masked, n_kept, n_masked


def collate_cells(
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
) -> dict[str, np.ndarray]:
    """CSR cells (vocab-ordered genes, uint8 bins) -> the batch dict of docs/ARCHITECTURE.md."""
    offsets = np.asarray(offsets, dtype=np.int64)
    joinids = np.asarray(joinids, dtype=np.int64)
    n_cells = len(offsets) - 1
    kept, masked, n_kept, n_masked = select_tokens(
        offsets, genes, joinids, seed=seed, epoch=epoch, max_genes=max_genes, mask_ratio=mask_ratio
    )
    idx = np.flatnonzero(kept)  # vocab order within each cell, cells in batch order
    row = np.repeat(np.arange(n_cells, dtype=np.int64), n_kept)
    is_masked = masked[idx]
    kept_start = np.concatenate([[0], np.cumsum(n_kept)])[:-1]
    if known_first:
        known = ~is_masked
        known_before = np.cumsum(known) - known  # exclusive prefix counts
        masked_before = np.cumsum(is_masked) - is_masked
        first = kept_start[row]  # index in idx of the row's first kept entry
        known_rank = known_before - known_before[first]
        masked_rank = masked_before - masked_before[first]
        pos = np.where(known, 1 + known_rank, 1 + (n_kept - n_masked)[row] + masked_rank)
    else:
        pos = 1 + np.arange(len(idx), dtype=np.int64) - kept_start[row]
    width = int(n_kept.max()) + 1 if n_cells else 1
    flat = row * width + pos

    gene_ids = np.full((n_cells, width), PAD_ID, dtype=np.int64)
    gene_ids[:, 0] = CLS_ID
    gene_ids.reshape(-1)[flat] = genes[idx]
    target = np.full((n_cells, width), PAD_VALUE, dtype=np.float32)
    target[:, 0] = CLS_VALUE
    target.reshape(-1)[flat] = bins[idx]
    value_mask = np.zeros((n_cells, width), dtype=bool)
    value_mask.reshape(-1)[flat[is_masked]] = True
    values = np.where(value_mask, np.float32(MASK_VALUE), target)
    lengths = (n_kept + 1).astype(np.int32)
    padding_mask = np.arange(width)[None, :] >= lengths[:, None]
    if labels is None:
        labels = np.full(n_cells, -1, dtype=np.int64)
    return {
        "gene_ids": gene_ids,
        "values": values,
        "target_values": target,
        "value_mask": value_mask,
        "padding_mask": padding_mask,
        "lengths": lengths,
        "cell_ids": joinids.copy(),
        "labels": np.asarray(labels, dtype=np.int64),
    }


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
