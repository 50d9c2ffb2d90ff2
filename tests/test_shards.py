import io
import json
import tarfile

import numpy as np
import pytest

from celljepa_dist.data.binning import bin_csr
from celljepa_dist.data.shards import (
    CellBlock,
    ShardWriter,
    build_manifest,
    check_vocab_hash,
    decode_block,
    encode_block,
    iter_shard_blocks,
    read_manifest,
    read_shard,
    sha256_file,
    validate_shards,
    write_manifest,
    write_shard,
)


def random_cells(n, seed=0, vocab_size=500):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 60, size=n)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    genes = np.concatenate([np.sort(rng.choice(np.arange(3, vocab_size), size=k, replace=False)) for k in lens])
    counts = (rng.negative_binomial(1, 0.4, size=int(offsets[-1])) + 1).astype(np.float32)
    return CellBlock(offsets, genes.astype(np.int32), bin_csr(offsets, counts, 51), counts,
                     np.arange(n, dtype=np.int64) * 3 + 100,
                     {"cell_type": [f"type{i % 4}" for i in range(n)], "dataset_id": ["d0"] * n,
                      "donor_id": [f"donor{i % 2}" for i in range(n)], "assay": ["10x 3' v3"] * n})


def assert_blocks_equal(a, b):
    for f in ("offsets", "genes", "bins", "counts", "joinids"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        np.testing.assert_array_equal(x, y, err_msg=f)
    assert a.meta == b.meta


def test_roundtrip_in_blocks(tmp_path):
    cells = random_cells(250)
    entry = write_shard(tmp_path / "shard-000000.tar", cells, block_size=64)
    assert entry["cells"] == 250 and entry["sha256"] == sha256_file(tmp_path / "shard-000000.tar")
    assert_blocks_equal(read_shard(tmp_path / "shard-000000.tar"), cells)
    blocks = list(iter_shard_blocks(tmp_path / "shard-000000.tar"))
    assert [k for k, _ in blocks] == ["00000", "00001", "00002", "00003"]
    assert [len(b) for _, b in blocks] == [64, 64, 64, 58]
    # per cell views agree with the source
    assert read_shard(tmp_path / "shard-000000.tar").cell(200)["cell_type"] == cells.cell(200)["cell_type"]


def test_tar_layout_is_plain_webdataset(tmp_path):
    write_shard(tmp_path / "s.tar", random_cells(10), block_size=4)
    with tarfile.open(tmp_path / "s.tar") as tar:
        names = tar.getnames()
        info = tar.getmember("00000.genes.npy")
    assert names[:6] == ["00000.offsets.npy", "00000.genes.npy", "00000.bins.npy", "00000.counts.npy",
                         "00000.joinids.npy", "00000.meta.json"]
    assert len(names) == 3 * 6 and info.mtime == 0 and info.uid == 0


def test_bytes_identical_on_rewrite(tmp_path):
    cells = random_cells(100, seed=5)
    a = write_shard(tmp_path / "a.tar", cells)
    b = write_shard(tmp_path / "b.tar", cells)
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def tarfile_reference_bytes(cells, block_size):
    """The shard as Python's tarfile writes it ("w|", USTAR) from np.save members: the
    independent reference for ShardWriter's streamed bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for b, start in enumerate(range(0, len(cells), block_size)):
            for suffix, data in encode_block(cells.slice(start, min(start + block_size, len(cells)))).items():
                info = tarfile.TarInfo(f"{b:05d}.{suffix}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                    len(data), 0, 0o644, 0, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("pieces,block_size", [([250], 64), ([0, 1, 7, 64, 3, 175], 64), ([5, 5, 5], 1),
                                               ([100], 100), ([33, 67], 1000), ([0], 16)])
def test_streamed_writer_matches_tarfile_bytes(tmp_path, pieces, block_size):
    cells = random_cells(max(sum(pieces), 1), seed=len(pieces)).slice(0, sum(pieces))
    with ShardWriter(tmp_path / "s.tar", block_size) as writer:
        start = 0
        for k in pieces:
            writer.add(cells.slice(start, start + k))
            start += k
    data = (tmp_path / "s.tar").read_bytes()
    assert data == tarfile_reference_bytes(cells, block_size)
    assert writer.entry == {"name": "s.tar", "cells": len(cells), "sha256": sha256_file(tmp_path / "s.tar")}
    back = read_shard(tmp_path / "s.tar")
    if len(cells):
        assert_blocks_equal(back, cells)
    else:  # an empty tar carries no meta keys
        assert len(back) == 0 and back.offsets.tolist() == [0]


def test_writer_failure_leaves_no_file(tmp_path):
    cells = random_cells(40)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "s.tar", 8) as writer:
            writer.add(cells)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    other = random_cells(5)
    other.meta = {"cell_type": other.meta["cell_type"]}
    with pytest.raises(ValueError, match="s.tar.*meta keys"):
        with ShardWriter(tmp_path / "s.tar", 8) as writer:
            writer.add(cells)
            writer.add(other)
    assert list(tmp_path.iterdir()) == []


def test_webdataset_reads_it(tmp_path):
    import webdataset as wds

    cells = random_cells(90, seed=2)
    write_shard(tmp_path / "s.tar", cells, block_size=32)
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    blocks = [decode_block(s, s["__key__"]) for s in samples]
    assert_blocks_equal(CellBlock.concat(blocks), cells)


def test_truncated_shard_error_names_it(tmp_path):
    write_shard(tmp_path / "shard-000003.tar", random_cells(200), block_size=50)
    data = (tmp_path / "shard-000003.tar").read_bytes()
    (tmp_path / "shard-000003.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="shard-000003.tar"):
        read_shard(tmp_path / "shard-000003.tar")


def test_corrupt_member_error_names_shard_and_block(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("00000.offsets.npy", b"garbage")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "bad.tar").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"bad.tar block 00000.*offsets.npy"):
        read_shard(tmp_path / "bad.tar")


def test_failed_write_leaves_nothing(tmp_path):
    cells = random_cells(20)
    cells.genes = cells.genes[:-1]  # inconsistent with offsets
    with pytest.raises(ValueError, match="genes"):
        write_shard(tmp_path / "s.tar", cells)
    assert list(tmp_path.iterdir()) == []


def test_manifest_roundtrip_and_vocab_check(tmp_path):
    entries = [write_shard(tmp_path / f"shard-{i:06d}.tar", random_cells(n, seed=i)) for i, n in enumerate([30, 7])]
    m = build_manifest(entries, "ab" * 32, 51, {"uri": "x"}, {"empty_cells": 2})
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back == m and back["total_cells"] == 37 and back["binning"]["n_bins"] == 51
    check_vocab_hash(back, "ab" * 32)
    with pytest.raises(ValueError, match="vocab sha256"):
        check_vocab_hash(back, "cd" * 32)
    bad = dict(m, total_cells=38)
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="total_cells"):
        read_manifest(tmp_path)


def test_tiny_shards_fixture_is_consistent(tiny_shards):
    from celljepa_dist.data.vocab import GeneVocab

    shards_dir, vocab_path = tiny_shards
    m = read_manifest(shards_dir)
    check_vocab_hash(m, GeneVocab.load(vocab_path).sha256)
    sizes = [s["cells"] for s in m["shards"]]
    assert len(sizes) >= 3 and len(set(sizes)) > 1 and m["total_cells"] == sum(sizes)
    for s in m["shards"]:
        assert sha256_file(shards_dir / s["name"]) == s["sha256"]
        assert len(read_shard(shards_dir / s["name"])) == s["cells"]


def test_validate_reports_each_fault_naming_the_shard(tmp_path):
    from celljepa_dist.data.shards import shard_name

    good = random_cells(40, seed=1)
    bad_bins = random_cells(40, seed=2)
    bad_bins.bins = bad_bins.bins.copy()
    bad_bins.bins[5] = 1 if bad_bins.bins[5] != 1 else 2
    unsorted = random_cells(40, seed=3)
    unsorted.genes = unsorted.genes.copy()
    unsorted.genes[:2] = unsorted.genes[:2][::-1]
    entries = [write_shard(tmp_path / shard_name(i), c) for i, c in enumerate([good, bad_bins, unsorted])]
    write_manifest(tmp_path, build_manifest(entries, "ab" * 32, 51, {}, {}))
    faults = validate_shards(tmp_path, "ab" * 32)
    assert len(faults) == 2, faults
    assert "shard-000001.tar" in faults[0] and "bins" in faults[0]
    assert "shard-000002.tar" in faults[1] and "ascending" in faults[1]
    entries[0]["cells"] += 1
    write_manifest(tmp_path, build_manifest(entries, "ab" * 32, 51, {}, {}))
    assert any("shard-000000.tar: 40 cells, manifest says 41" in f for f in validate_shards(tmp_path))
