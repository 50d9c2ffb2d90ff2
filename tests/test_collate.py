"""Per-cell transforms against a naive per-cell reference written with Python integers."""
import math

import numpy as np
import pytest
import torch

from celljepa_dist.data import collate as C
from celljepa_dist.tokens import CLS_ID, PAD_ID

M32, M64 = 2**32 - 1, 2**64 - 1


def ref_splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_key(seed: int, epoch: int, joinid: int, gene: int) -> int:
    base = ref_splitmix64(ref_splitmix64((seed ^ 0xCE11) & M64) ^ epoch)
    k = ref_splitmix64(base ^ (joinid & M64))
    ck = (k ^ (k >> 32)) & M32
    h = ((gene * 0x9E3779B1) & M32) ^ ck
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def ref_cell(genes, bins, joinid, seed, epoch, max_genes, ratio, known_first):
    """One cell, the spec read literally: (gene ids, values, targets, masked flags) without padding."""
    keys = [ref_key(seed, epoch, joinid, int(g)) for g in genes]
    by_key = sorted(range(len(genes)), key=lambda i: keys[i])
    k = min(len(genes), max_genes)
    m = math.ceil(round(k * ratio, 6))
    kept, masked = sorted(by_key[:k]), set(by_key[:m])
    if known_first:
        kept = [i for i in kept if i not in masked] + [i for i in kept if i in masked]
    ids = [CLS_ID] + [int(genes[i]) for i in kept]
    target = [0.0] + [float(bins[i]) for i in kept]
    flags = [False] + [i in masked for i in kept]
    values = [-1.0 if f else t for t, f in zip(target, flags)]
    return ids, values, target, flags


def random_cells(rng, n_cells, n_range=(1, 1500), vocab=5000):
    n = rng.integers(*n_range, size=n_cells)
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    genes = np.concatenate([np.sort(rng.choice(vocab, k, replace=False)) + 3 for k in n]).astype(np.int32)
    bins = rng.integers(1, 51, size=int(offsets[-1])).astype(np.uint8)
    joinids = rng.choice(10**9, n_cells, replace=False).astype(np.int64)
    return offsets, genes, bins, joinids


@pytest.mark.parametrize("ratio,known_first", [(0.0, False), (0.15, False), (0.4, True), (1.0, True), (0.15, True)])
def test_batch_equals_naive_reference(ratio, known_first):
    rng = np.random.default_rng(7)
    offsets, genes, bins, joinids = random_cells(rng, 24)
    # edge lengths: no gene, one gene, exactly max_genes, max_genes + 1
    offsets, genes, bins, joinids = _with_edge_cells(rng, offsets, genes, bins, joinids, [0, 1, 60, 61])
    labels = rng.integers(-1, 5, size=len(joinids))
    b = C.collate_cells(offsets, genes, bins, joinids, labels, seed=3, epoch=2, max_genes=60,
                        mask_ratio=ratio, known_first=known_first)
    width = b["gene_ids"].shape[1]
    assert width == max(min(n, 60) for n in np.diff(offsets)) + 1
    for i in range(len(joinids)):
        g, v, t, f = ref_cell(genes[offsets[i]:offsets[i + 1]], bins[offsets[i]:offsets[i + 1]],
                              int(joinids[i]), 3, 2, 60, ratio, known_first)
        n = len(g)
        assert b["lengths"][i] == n
        assert b["gene_ids"][i, :n].tolist() == g and (b["gene_ids"][i, n:] == PAD_ID).all()
        assert b["values"][i, :n].tolist() == v and (b["values"][i, n:] == -2).all()
        assert b["target_values"][i, :n].tolist() == t and (b["target_values"][i, n:] == -2).all()
        assert b["value_mask"][i, :n].tolist() == f and not b["value_mask"][i, n:].any()
        assert not b["padding_mask"][i, :n].any() and b["padding_mask"][i, n:].all()
    assert b["cell_ids"].tolist() == joinids.tolist() and b["labels"].tolist() == labels.tolist()


def _with_edge_cells(rng, offsets, genes, bins, joinids, sizes):
    for k in sizes:
        g = np.sort(rng.choice(5000, k, replace=False)).astype(np.int32) + 3
        genes = np.concatenate([genes, g])
        bins = np.concatenate([bins, rng.integers(1, 51, k).astype(np.uint8)])
        offsets = np.concatenate([offsets, [offsets[-1] + k]])
        joinids = np.concatenate([joinids, [10**9 + k]])
    return offsets, genes, bins, joinids


def test_dtypes_and_contract():
    rng = np.random.default_rng(0)
    b = C.to_tensors(C.collate_cells(*random_cells(rng, 5), seed=0, epoch=0))
    expect = {"gene_ids": torch.int64, "values": torch.float32, "target_values": torch.float32,
              "value_mask": torch.bool, "padding_mask": torch.bool, "lengths": torch.int32,
              "cell_ids": torch.int64, "labels": torch.int64}
    assert {k: v.dtype for k, v in b.items()} == expect
    assert (b["gene_ids"][:, 0] == CLS_ID).all() and not b["value_mask"][:, 0].any()
    assert (b["labels"] == -1).all()
    kept = torch.clamp(b["lengths"] - 1, max=600)
    assert (b["value_mask"].sum(1) == torch.ceil(kept * 0.15)).all()
    assert torch.equal(torch.where(b["value_mask"], b["target_values"], b["values"]), b["target_values"])


def test_cell_tokens_do_not_depend_on_batch_composition():
    rng = np.random.default_rng(1)
    offsets, genes, bins, joinids = random_cells(rng, 12)
    full = C.collate_cells(offsets, genes, bins, joinids, seed=5, epoch=1, max_genes=100)
    order = rng.permutation(12)[:5]
    sub_off, flat = C.gather_cells(offsets, order)
    part = C.collate_cells(sub_off, genes[flat], bins[flat], joinids[order], seed=5, epoch=1, max_genes=100)
    for j, i in enumerate(order):
        n = full["lengths"][i]
        for key in ("gene_ids", "values", "value_mask"):
            assert np.array_equal(part[key][j, :n], full[key][i, :n])


def test_gather_cells_matches_naive():
    rng = np.random.default_rng(2)
    offsets, genes, _, _ = random_cells(rng, 9, (0, 30))
    cells = np.array([4, 0, 4, 8, 3])
    new_off, flat = C.gather_cells(offsets, cells)
    expect = np.concatenate([genes[offsets[c]:offsets[c + 1]] for c in cells])
    assert np.array_equal(genes[flat], expect)
    assert new_off.tolist() == [0] + np.cumsum([offsets[c + 1] - offsets[c] for c in cells]).tolist()


def test_subsampling_and_masking_are_uniform():
    """Over many epochs each gene is kept with probability k/n and masked with m/n."""
    n, k, epochs = 40, 10, 4000
    genes = (np.arange(n) * 3 + 3).astype(np.int32)
    offsets = np.array([0, n])
    kept = np.zeros(n)
    masked = np.zeros(n)
    for e in range(epochs):
        sel_k, sel_m, _, _ = C.select_tokens(offsets, genes, np.array([11]), seed=0, epoch=e,
                                             max_genes=k, mask_ratio=0.4)
        kept += sel_k
        masked += sel_m
    # binomial sd of a frequency at p=0.25 over 4000 draws is 0.0068; 5 sd
    assert np.abs(kept / epochs - k / n).max() < 0.035
    assert np.abs(masked / epochs - 4 / n).max() < 0.025
    assert (masked <= kept).all()


def test_epoch_and_seed_change_the_view():
    rng = np.random.default_rng(3)
    cells = random_cells(rng, 4, (800, 900))
    views = [C.collate_cells(*cells, seed=s, epoch=e)["gene_ids"] for s, e in [(0, 0), (0, 1), (1, 0)]]
    assert not np.array_equal(views[0], views[1]) and not np.array_equal(views[0], views[2])
    assert np.array_equal(views[0], C.collate_cells(*cells, seed=0, epoch=0)["gene_ids"])


def test_mask_ratio_validation():
    C.check_mask_ratio(0.4)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mask_ratio"):
            C.check_mask_ratio(bad)


def test_kth_smallest_matches_sort():
    rng = np.random.default_rng(4)
    counts = np.array([1, 2, 5, 3000, 700, 1024, 9])
    keys = rng.integers(0, 2**32, counts.sum(), dtype=np.uint64).astype(np.uint32)
    keys[counts[:3].sum():counts[:4].sum()] >>= 20  # one row crowded into the lowest buckets
    starts = np.concatenate([[0], np.cumsum(counts)])
    for pick in (lambda n: 1, lambda n: n, lambda n: (n + 1) // 2):
        kth = np.array([pick(int(n)) for n in counts])
        expect = [np.sort(keys[starts[i]:starts[i + 1]])[kth[i] - 1] for i in range(len(counts))]
        assert C.kth_smallest(keys, counts, kth).tolist() == expect
