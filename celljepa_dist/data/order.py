"""Global sample order: pure functions of (seed, epoch, rank, worker).

One epoch's order over N cells stored in S shards (manifest order):

1. shards are visited in a permutation of (seed, epoch);
2. each shard's cells in a permutation of (seed, epoch, shard index);
3. concatenated, this is the *global sequence* of N positions.

Only `usable = floor(N / (world * B)) * world * B` positions are used, so every rank gets the
same number of full batches (uneven ranks hang DDP). The dropped tail (< world * B cells) is the
end of the global sequence; the sequence changes every epoch, so a different set of cells is
dropped each epoch. Rank r owns the contiguous span [r * N_r, (r + 1) * N_r), N_r = usable/world,
so a rank touches only ~1/world of the shards. Rank batch b is span [b * B, (b + 1) * B).

DataLoader worker w of W builds the rank batches b >= start whose chunk (b - start) // chunk is
w modulo W; the loader puts batches back in index order, so the rank's batch sequence is the same
for any W and chunk (the number of workers may change on resume).

Random permutations come from numpy's PCG64 seeded with a SeedSequence of the integer tuple, so
they are identical on every machine and numpy version that keeps PCG64's stream stable.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Distinguishes the permutation streams so (seed, epoch) never reuse one another's randomness.
_SHARD_TAG = 0x5348
_CELL_TAG = 0x43454C


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def shard_permutation(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """Order in which the epoch visits the manifest's shards (indices into the manifest list)."""
    return _rng(_SHARD_TAG, seed, epoch).permutation(n_shards)


def cell_permutation(n_cells: int, seed: int, epoch: int, shard_index: int) -> np.ndarray:
    """Order in which the epoch visits the cells of manifest shard `shard_index`."""
    return _rng(_CELL_TAG, seed, epoch, shard_index).permutation(n_cells)


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch. Positions are global-sequence positions."""

    total_cells: int
    usable_cells: int
    batch_size: int
    world_size: int
    rank: int
    num_batches: int  # per rank, identical on every rank
    span_start: int
    span_stop: int

    @property
    def dropped_cells(self) -> int:
        return self.total_cells - self.usable_cells


def rank_plan(total_cells: int, batch_size: int, world_size: int, rank: int) -> RankPlan:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    per_step = world_size * batch_size
    usable = (total_cells // per_step) * per_step
    per_rank = usable // world_size
    return RankPlan(
        total_cells=total_cells,
        usable_cells=usable,
        batch_size=batch_size,
        world_size=world_size,
        rank=rank,
        num_batches=per_rank // batch_size,
        span_start=rank * per_rank,
        span_stop=(rank + 1) * per_rank,
    )


def worker_batches(num_batches: int, start_batch: int, worker: int, num_workers: int, chunk: int = 1) -> list[int]:
    """Rank batch indices built by DataLoader worker `worker`: from start_batch on, chunks of
    `chunk` consecutive batches are dealt to the workers in turn. Larger chunks mean a worker
    reads fewer of the shards (each shard is read by ~1 worker instead of all of them); the
    loader restores batch order in the main process (buffering up to (W-1) * chunk batches)."""
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is not in [0, num_workers={num_workers})")
    if not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch {start_batch} is not in [0, {num_batches}]")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out: list[int] = []
    for first in range(start_batch + worker * chunk, num_batches, num_workers * chunk):
        out.extend(range(first, min(first + chunk, num_batches)))
    return out


class EpochOrder:
    """Maps global-sequence positions of one epoch to (manifest shard index, cell within shard).

    Cell permutations are computed lazily per shard, so memory is O(cells of shards touched).
    """

    def __init__(self, shard_cells: list[int] | np.ndarray, seed: int, epoch: int):
        self.shard_cells = np.asarray(shard_cells, dtype=np.int64)
        if self.shard_cells.ndim != 1 or (self.shard_cells < 0).any():
            raise ValueError("shard_cells must be a 1-D list of non-negative cell counts")
        self.seed, self.epoch = int(seed), int(epoch)
        self.shard_order = shard_permutation(len(self.shard_cells), self.seed, self.epoch)
        # starts[i] = first global position of the i-th shard visited
        self.starts = np.concatenate([[0], np.cumsum(self.shard_cells[self.shard_order])])
        self._perms: dict[int, np.ndarray] = {}

    @property
    def total_cells(self) -> int:
        return int(self.starts[-1])

    def cell_perm(self, shard_index: int) -> np.ndarray:
        perm = self._perms.get(shard_index)
        if perm is None:
            perm = cell_permutation(int(self.shard_cells[shard_index]), self.seed, self.epoch, shard_index)
            self._perms[shard_index] = perm
        return perm

    def forget(self, keep: set[int]) -> None:
        """Drop cached permutations of shards not in `keep` (bounded memory in long spans)."""
        for s in [s for s in self._perms if s not in keep]:
            del self._perms[s]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (manifest shard index, cell index within that shard)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.total_cells):
            raise ValueError(f"positions outside [0, {self.total_cells})")
        visit = np.searchsorted(self.starts, positions, side="right") - 1
        shard = self.shard_order[visit]
        within = positions - self.starts[visit]
        cell = np.empty_like(positions)
        for s in np.unique(shard):
            sel = shard == s
            cell[sel] = self.cell_perm(int(s))[within[sel]]
        return shard, cell

    def shards_for(self, start: int, stop: int) -> list[int]:
        """Manifest indices of the shards holding positions [start, stop), in visiting order."""
        if stop <= start:
            return []
        first = np.searchsorted(self.starts, start, side="right") - 1
        last = np.searchsorted(self.starts, stop - 1, side="right") - 1
        return [int(s) for s in self.shard_order[first : last + 1] if self.shard_cells[s] > 0]


def batch_positions(plan: RankPlan, batch: int) -> np.ndarray:
    """Global positions of rank batch `batch`."""
    if not 0 <= batch < plan.num_batches:
        raise ValueError(f"batch {batch} is not in [0, {plan.num_batches})")
    start = plan.span_start + batch * plan.batch_size
    return np.arange(start, start + plan.batch_size, dtype=np.int64)


def fill_skipped(order: EpochOrder, plan: RankPlan, positions: np.ndarray, bad_shards: set[int]) -> np.ndarray:
    """Replace positions that fall in skipped shards so the batch stays full (no DDP hang).

    The k-th lost slot of a batch takes the k-th good position of the rank's span after the
    batch's end, wrapping to the span start: those cells are seen twice this epoch. A pure
    function of (order, plan, positions, bad set), hence identical for any worker count.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if not bad_shards:
        return positions
    shard, _ = order.locate(positions)
    lost = np.flatnonzero(np.isin(shard, list(bad_shards)))
    if lost.size == 0:
        return positions
    if all(s in bad_shards for s in order.shards_for(plan.span_start, plan.span_stop)):
        raise RuntimeError(f"rank {plan.rank}: every shard of its span was skipped; nothing to read")
    out = positions.copy()
    cursor, filled = int(positions[-1]) + 1, 0
    while filled < lost.size:
        if cursor >= plan.span_stop:
            cursor = plan.span_start
        visit = int(np.searchsorted(order.starts, cursor, side="right") - 1)
        seg_stop = min(int(order.starts[visit + 1]), plan.span_stop)
        take = seg_stop - cursor
        if int(order.shard_order[visit]) not in bad_shards:
            n = min(take, lost.size - filled)
            out[lost[filled : filled + n]] = np.arange(cursor, cursor + n)
            filled += n
        cursor = seg_stop
    return out
