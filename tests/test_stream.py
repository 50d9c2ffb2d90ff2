"""The streaming loader on real shards written by the shard writer (tests/conftest.py::tiny_shards)."""
import shutil
import warnings

import numpy as np
import pytest
import torch

from celljepa_dist.data import order as O
from celljepa_dist.data.shards import read_manifest, read_shard
from celljepa_dist.data.stream import LoaderConfig, ShardError, build_loader, read_shard_cells, unpack_batch

KEYS = ("gene_ids", "values", "target_values", "value_mask", "padding_mask", "lengths", "cell_ids", "labels")


def cfg_for(shards_dir, **kw):
    base = dict(shards_dir=str(shards_dir), batch_size=8, max_genes=40, mask_ratio=0.15, seed=11, num_workers=0)
    base.update(kw)
    return LoaderConfig(**base)


def bad_cfg(shards_dir, field, value):
    cfg = cfg_for(shards_dir)
    setattr(cfg, field, value)
    return cfg


def run(cfg, rank=0, world=1, epoch=0, resume=None):
    loader, n = build_loader(cfg, rank, world, epoch, resume)
    batches = list(loader)
    assert len(batches) == n == len(loader)
    return loader, batches


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_once_and_equal_batch_counts(tiny_shards, world, workers):
    shards_dir, _ = tiny_shards
    total = read_manifest(shards_dir)["total_cells"]
    seen, counts = [], set()
    for rank in range(world):
        _, batches = run(cfg_for(shards_dir, num_workers=workers), rank, world)
        counts.add(len(batches))
        assert all(b["cell_ids"].shape == (8,) for b in batches)
        seen += [c for b in batches for c in b["cell_ids"].tolist()]
    assert len(counts) == 1  # uneven shards (70, 70, 70, 70, 20), equal batches per rank
    assert len(seen) == len(set(seen)) > total - world * 8


def test_batches_follow_the_pure_order(tiny_shards):
    """Loader output = the order module's (rank, batch) -> (shard, cell), read with the writer's reader."""
    shards_dir, _ = tiny_shards
    manifest = read_manifest(shards_dir)
    joinids = [read_shard(shards_dir / s["name"]).joinids for s in manifest["shards"]]
    order = O.EpochOrder([s["cells"] for s in manifest["shards"]], 11, 2)
    plan = O.rank_plan(order.total_cells, 8, 2, 1)
    _, batches = run(cfg_for(shards_dir, num_workers=2), rank=1, world=2, epoch=2)
    for b, batch in enumerate(batches):
        shard, cell = order.locate(O.batch_positions(plan, b))
        assert batch["cell_ids"].tolist() == [int(joinids[s][c]) for s, c in zip(shard, cell)]


def test_tokens_match_the_shard_contents(tiny_shards):
    shards_dir, _ = tiny_shards
    manifest = read_manifest(shards_dir)
    cells = {}
    for s in manifest["shards"]:
        block = read_shard(shards_dir / s["name"])
        for i, j in enumerate(block.joinids.tolist()):
            a, b = block.offsets[i], block.offsets[i + 1]
            cells[j] = dict(zip(block.genes[a:b].tolist(), block.bins[a:b].tolist()))
    _, batches = run(cfg_for(shards_dir, known_first=True))
    for batch in batches:
        for i, j in enumerate(batch["cell_ids"].tolist()):
            n = int(batch["lengths"][i])
            genes = batch["gene_ids"][i, 1:n].tolist()
            assert len(genes) == min(40, len(cells[j])) == len(set(genes))
            assert batch["target_values"][i, 1:n].tolist() == [float(cells[j][g]) for g in genes]
            masked = batch["value_mask"][i, :n]
            assert masked.sum() == np.ceil(round(0.15 * (n - 1), 6))
            assert not masked[: n - int(masked.sum())].any()  # known first, masked last


def test_worker_count_and_batch_size_do_not_change_a_cells_tokens(tiny_shards):
    shards_dir, _ = tiny_shards
    _, a = run(cfg_for(shards_dir, num_workers=0))
    _, b = run(cfg_for(shards_dir, num_workers=2, prefetch_factor=1))
    assert same(a, b)
    _, b1 = run(cfg_for(shards_dir, num_workers=2, worker_chunk_batches=1))
    _, b3 = run(cfg_for(shards_dir, num_workers=2, worker_chunk_batches=3))
    assert same(a, b1) and same(a, b3)
    _, c = run(cfg_for(shards_dir, batch_size=5, num_workers=2))

    def per_cell(batches):
        out = {}
        for batch in batches:
            for i, j in enumerate(batch["cell_ids"].tolist()):
                n = int(batch["lengths"][i])
                out[j] = (batch["gene_ids"][i, :n].tolist(), batch["values"][i, :n].tolist())
        return out

    ca, cc = per_cell(a), per_cell(c)
    common = set(ca) & set(cc)
    assert len(common) > 250 and all(ca[j] == cc[j] for j in common)


@pytest.mark.parametrize("workers_before,workers_after", [(0, 2), (2, 0)])
def test_resume_is_bit_exact(tiny_shards, workers_before, workers_after):
    shards_dir, _ = tiny_shards
    loader, full = run(cfg_for(shards_dir, num_workers=workers_before), rank=1, world=2, epoch=1)
    for k in (0, 1, 7, len(full) - 1, len(full)):
        state = loader.state_dict(k)
        resumed, rest = run(cfg_for(shards_dir, num_workers=workers_after), 1, 2, 1, resume=state)
        assert len(resumed) == len(full) - k and same(rest, full[k:])
        assert resumed.state_dict(len(rest))["batches_done"] == len(full)


def test_packed_batch_roundtrip():
    from celljepa_dist.data.collate import collate_cells_packed

    rng = np.random.default_rng(0)
    n = rng.integers(1, 50, 6)
    offsets = np.concatenate([[0], np.cumsum(n)])
    genes = np.concatenate([np.sort(rng.choice(200, k, replace=False)) + 3 for k in n]).astype(np.int32)
    bins = rng.integers(1, 51, int(offsets[-1])).astype(np.uint8)
    buffer, layout, arrays = collate_cells_packed(offsets, genes, bins, np.arange(6) * 3, seed=1, epoch=0,
                                                  max_genes=20)
    tensors = unpack_batch(torch.from_numpy(buffer), layout)
    assert list(tensors) == list(KEYS)
    assert all(np.array_equal(tensors[k].numpy(), v) and tensors[k].numpy().dtype == v.dtype for k, v in arrays.items())


def test_resume_refuses_a_different_run(tiny_shards):
    shards_dir, _ = tiny_shards
    loader, _ = build_loader(cfg_for(shards_dir), 0, 2, 0)
    state = loader.state_dict(3)
    with pytest.raises(ValueError, match="world_size"):
        build_loader(cfg_for(shards_dir), 0, 3, 0, state)
    with pytest.raises(ValueError, match="seed"):
        build_loader(cfg_for(shards_dir, seed=12), 0, 2, 0, state)
    with pytest.raises(ValueError, match="epoch"):
        build_loader(cfg_for(shards_dir), 0, 2, 1, state)
    with pytest.raises(ValueError, match="batches_done"):
        build_loader(cfg_for(shards_dir), 0, 2, 0, dict(state, batches_done=10**6))


def test_epochs_reorder_and_mask_ratio_zero(tiny_shards):
    shards_dir, _ = tiny_shards
    _, e0 = run(cfg_for(shards_dir, mask_ratio=0.0))
    _, e1 = run(cfg_for(shards_dir, mask_ratio=0.0), epoch=1)
    assert e0[0]["cell_ids"].tolist() != e1[0]["cell_ids"].tolist()
    assert not any(b["value_mask"].any() for b in e0)
    assert all(torch.equal(b["values"], b["target_values"]) for b in e0)


def test_vocab_hash_and_config_are_checked(tiny_shards, tmp_path):
    shards_dir, vocab_path = tiny_shards
    build_loader(cfg_for(shards_dir, vocab_path=str(vocab_path)), 0, 1, 0)
    with pytest.raises(ValueError, match="vocab sha256"):
        build_loader(cfg_for(shards_dir), 0, 1, 0, vocab_sha256="0" * 64)
    for field, value in [("batch_size", 0), ("mask_ratio", 1.5), ("on_error", "ignore"),
                         ("num_workers", -1), ("max_skip_fraction", 2.0), ("shards_dir", "")]:
        with pytest.raises(ValueError, match=field):
            bad_cfg(shards_dir, field, value).validate()
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_loader(cfg_for(shards_dir, batch_size=200), 0, 2, 0)


# --- corrupt shards ------------------------------------------------------------------------------

def corrupt_copy(shards_dir, tmp_path, how):
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir, dst)
    victim = dst / read_manifest(dst)["shards"][1]["name"]
    data = bytearray(victim.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip one byte in the middle of a gene array: tar and npy headers stay valid
        data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    return dst, victim.name


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_shard_raises_naming_it(tiny_shards, tmp_path, how):
    dst, name = corrupt_copy(tiny_shards[0], tmp_path, how)
    with pytest.raises(ShardError, match=name):
        read_shard_cells(dst / name, read_manifest(dst)["shards"][1]["sha256"])
    with pytest.raises(Exception, match=name):  # surfaces through the DataLoader worker too
        run(cfg_for(dst, num_workers=2))
    if how == "truncate":  # without checksums the tar parser itself must notice
        with pytest.raises(ShardError, match=f"{name}: unreadable or truncated tar"):
            read_shard_cells(dst / name)
        with pytest.raises(ShardError, match=name):
            run(cfg_for(dst, verify_checksums=False))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_shard_skipped_keeps_batches_full(tiny_shards, tmp_path, how):
    dst, name = corrupt_copy(tiny_shards[0], tmp_path, how)
    bad_ids = set(read_shard(tiny_shards[0] / name).joinids.tolist())
    for workers in (0, 2):
        cfg = cfg_for(dst, on_error="skip", max_skip_fraction=0.3, num_workers=workers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader, batches = run(cfg, rank=0, world=1)
        clean, _ = build_loader(cfg_for(tiny_shards[0]), 0, 1, 0)
        assert len(batches) == len(clean)  # same count as a clean run: no DDP hang
        ids = [c for b in batches for c in b["cell_ids"].tolist()]
        assert not set(ids) & bad_ids and all(b["cell_ids"].shape == (8,) for b in batches)
        assert loader.stats()["skipped_cells"] == 70 and loader.stats()["skipped_shards"] == 1
        if workers == 0:
            assert any(name in str(w.message) for w in caught)
    with pytest.raises(ShardError, match="max_skip_fraction"):
        run(cfg_for(dst, on_error="skip", max_skip_fraction=0.1))


def test_labels_are_carried(tmp_path):
    from celljepa_dist.data.shards import CellBlock, build_manifest, write_manifest, write_shard

    rng = np.random.default_rng(0)
    n = 20
    lens = rng.integers(1, 30, n)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    genes = np.concatenate([np.sort(rng.choice(100, k, replace=False)) + 3 for k in lens]).astype(np.int32)
    bins = rng.integers(1, 51, int(offsets[-1])).astype(np.uint8)
    labels = rng.integers(0, 4, n).tolist()
    block = CellBlock(offsets, genes, bins, bins.astype(np.float32), np.arange(n, dtype=np.int64) + 100,
                      {"cell_type": [f"t{x}" for x in labels], "label": labels})
    entry = write_shard(tmp_path / "shard-000000.tar", block, block_size=6)
    write_manifest(tmp_path, build_manifest([entry], "v", 51, {"kind": "test"}))
    _, batches = run(cfg_for(tmp_path, batch_size=4, mask_ratio=0.4))
    got = {c: l for b in batches for c, l in zip(b["cell_ids"].tolist(), b["labels"].tolist())}
    assert got == {100 + i: labels[i] for i in range(n)}


def test_resume_does_not_read_shards_already_passed(tiny_shards, tmp_path):
    """A shard wholly before the resume point may even be corrupt now: it is never opened."""
    src, _ = tiny_shards
    manifest = read_manifest(src)
    order = O.EpochOrder([s["cells"] for s in manifest["shards"]], 11, 0)
    first = int(order.shard_order[0])  # visited first: positions [0, cells)
    resume_at = -(-int(order.starts[1]) // 8)  # first batch starting after that shard
    dst, _ = corrupt_copy(src, tmp_path, "flip")  # corrupts manifest shard 1 ...
    if first != 1:  # ... make sure it is the one visited first
        shutil.copy(src / manifest["shards"][1]["name"], dst / manifest["shards"][1]["name"])
        data = bytearray((dst / manifest["shards"][first]["name"]).read_bytes())
        data[len(data) // 2] ^= 0x10
        (dst / manifest["shards"][first]["name"]).write_bytes(bytes(data))
    clean, full = run(cfg_for(src))
    _, rest = run(cfg_for(dst, num_workers=2), resume=clean.state_dict(resume_at))
    assert same(rest, full[resume_at:])
    with pytest.raises(Exception, match=manifest["shards"][first]["name"]):
        run(cfg_for(dst), resume=clean.state_dict(resume_at - 1))
