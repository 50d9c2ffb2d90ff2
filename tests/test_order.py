"""Sample order: exhaustive partition checks against a naive materialised reference."""
import itertools

import numpy as np
import pytest

from celljepa_dist.data import order as O

UNEVEN = [7, 0, 13, 5, 29, 1, 11]  # 66 cells, an empty shard, no size divides another


def naive_sequence(shard_cells, seed, epoch):
    """The global sequence written out in full: list of (shard, cell)."""
    seq = []
    for s in O.shard_permutation(len(shard_cells), seed, epoch):
        seq += [(int(s), int(c)) for c in O.cell_permutation(shard_cells[s], seed, epoch, int(s))]
    return seq


def rank_cells(shard_cells, seed, epoch, world, rank, batch, workers, start=0):
    """What (rank, every worker) yields, as {batch index: [(shard, cell), ...]}."""
    order = O.EpochOrder(shard_cells, seed, epoch)
    plan = O.rank_plan(order.total_cells, batch, world, rank)
    out = {}
    for w in range(workers):
        for b in O.worker_batches(plan.num_batches, start, w, workers):
            assert b not in out
            shard, cell = order.locate(O.batch_positions(plan, b))
            out[b] = list(zip(shard.tolist(), cell.tolist()))
    return plan, out


def test_permutations_are_permutations_and_depend_on_epoch():
    a, b = O.shard_permutation(50, 1, 0), O.shard_permutation(50, 1, 1)
    assert sorted(a) == list(range(50)) and not np.array_equal(a, b)
    assert np.array_equal(a, O.shard_permutation(50, 1, 0))
    assert not np.array_equal(O.cell_permutation(50, 1, 0, 3), O.cell_permutation(50, 1, 0, 4))


def test_golden_order():
    """Pinned (seed=17, epoch=3, world=2, rank=1, B=4, worker 1 of 2): guards against silent
    changes of the order, which would break resuming runs started with an older version."""
    _, batches = rank_cells(UNEVEN, 17, 3, world=2, rank=1, batch=4, workers=2)
    worker1 = {b: batches[b] for b in O.worker_batches(8, 0, 1, 2)}
    assert worker1 == GOLDEN


GOLDEN = {
    1: [(6, 3), (4, 10), (4, 17), (4, 11)],
    3: [(4, 0), (4, 18), (4, 16), (4, 1)],
    5: [(4, 20), (4, 5), (4, 7), (4, 25)],
    7: [(4, 27), (4, 2), (4, 4), (4, 23)],
}


@pytest.mark.parametrize("world,batch,workers", itertools.product([1, 2, 3], [1, 4, 7], [1, 2, 3]))
def test_exactly_once_and_equal_batch_counts(world, batch, workers):
    seq = naive_sequence(UNEVEN, 5, 1)
    seen, counts = [], set()
    for rank in range(world):
        plan, batches = rank_cells(UNEVEN, 5, 1, world, rank, batch, workers)
        assert sorted(batches) == list(range(plan.num_batches))
        counts.add(plan.num_batches)
        for b in range(plan.num_batches):
            assert len(batches[b]) == batch
            # each rank batch is the next slice of the naive sequence
            start = (rank * plan.num_batches + b) * batch
            assert batches[b] == seq[start : start + batch]
            seen += batches[b]
    assert len(counts) == 1
    assert len(seen) == len(set(seen)) == plan.usable_cells
    assert plan.dropped_cells < world * batch
    assert set(seq) - set(seen) == set(seq[plan.usable_cells :])  # the drop is the tail


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_workers_partition_the_remaining_batches(chunk):
    """Whatever W and chunk, the workers build each batch from `start` on exactly once; with
    chunk=1 the DataLoader's round-robin alone already yields them in order."""
    plan = O.rank_plan(1000, 8, 3, 2)
    for start, workers in itertools.product([0, 5, plan.num_batches - 1, plan.num_batches], [1, 2, 3, 4]):
        queues = [O.worker_batches(plan.num_batches, start, w, workers, chunk) for w in range(workers)]
        assert sorted(sum(queues, [])) == list(range(start, plan.num_batches))
        assert all(q == sorted(q) for q in queues)
        if chunk == 1:
            merged = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
            assert merged == list(range(start, plan.num_batches))
        elif workers > 1:  # a worker's batches come in runs of `chunk` consecutive indices
            for q in queues:
                runs = np.split(np.array(q), np.flatnonzero(np.diff(q) != 1) + 1) if q else []
                assert all(len(r) <= chunk for r in runs) and all(len(r) == chunk for r in runs[:-1])


def test_rank_touches_only_its_share_of_shards():
    cells = [100] * 30
    order = O.EpochOrder(cells, 0, 0)
    touched = []
    for rank in range(3):
        plan = O.rank_plan(order.total_cells, 16, 3, rank)
        touched.append(set(order.shards_for(plan.span_start, plan.span_stop)))
    assert all(len(t) <= 11 for t in touched)
    assert len(touched[0] & touched[2]) == 0


def test_fill_skipped_keeps_batches_full_with_following_good_cells():
    order = O.EpochOrder(UNEVEN, 2, 0)
    plan = O.rank_plan(order.total_cells, 5, 1, 0)
    bad = {int(order.shard_order[1]), 4}
    good_positions = [p for p in range(plan.span_start, plan.span_stop)
                      if int(order.locate(np.array([p]))[0][0]) not in bad]
    for b in range(plan.num_batches):
        pos = O.batch_positions(plan, b)
        filled = O.fill_skipped(order, plan, pos, bad)
        assert len(filled) == len(pos)
        assert not set(order.locate(filled)[0].tolist()) & bad
        lost = [i for i, p in enumerate(pos) if int(order.locate(np.array([p]))[0][0]) in bad]
        keep = [i for i in range(len(pos)) if i not in lost]
        assert np.array_equal(filled[keep], pos[keep])
        after = [p for p in good_positions if p > pos[-1]] + good_positions  # wrap to the span start
        assert filled[lost].tolist() == after[: len(lost)]
    assert np.array_equal(O.fill_skipped(order, plan, pos, set()), pos)
    with pytest.raises(RuntimeError, match="every shard"):
        O.fill_skipped(order, plan, pos, set(range(len(UNEVEN))))


def test_validation_errors():
    with pytest.raises(ValueError, match="rank"):
        O.rank_plan(100, 4, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        O.rank_plan(100, 0, 1, 0)
    with pytest.raises(ValueError, match="worker"):
        O.worker_batches(10, 0, 3, 3)
    with pytest.raises(ValueError, match="start_batch"):
        O.worker_batches(10, 11, 0, 1)
    with pytest.raises(ValueError, match="positions"):
        O.EpochOrder([3, 4], 0, 0).locate(np.array([7]))
