"""Workers share decoded shards: each shard is decoded once per rank, errors reach every worker."""
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from celljepa_dist.data.shard_cache import SharedShardCache, make_cache_dir
from celljepa_dist.data.shards import read_manifest
from celljepa_dist.data.stream import LoaderConfig, ShardCells, ShardError, build_loader, read_shard_cells


def _loader_for(shards_dir: Path, log: Path):
    entries = read_manifest(shards_dir)["shards"]

    def load(i):
        with open(log, "a") as f:  # one line per real decode, from any process
            f.write(f"{i}\n")
        e = entries[i]
        return read_shard_cells(shards_dir / e["name"], e["sha256"], e["cells"])

    return load


def _worker(root, shards_dir, log, indices, out):
    cache = SharedShardCache(Path(root), _loader_for(Path(shards_dir), Path(log)), ShardCells, ShardError)
    got = {}
    for i in indices:
        try:
            got[i] = int(np.asarray(cache.get(i).joinids, dtype=np.int64).sum())
        except ShardError as e:
            got[i] = str(e)
    out.put(got)


def run_workers(root, shards_dir, log, indices, n=3):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), str(shards_dir), str(log), indices, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results


def test_each_shard_decoded_once_across_processes(tiny_shards, tmp_path):
    shards_dir, _ = tiny_shards
    root, log = make_cache_dir(min_free_bytes=0), tmp_path / "decodes.log"
    try:
        results = run_workers(root, shards_dir, log, [0, 1, 2, 1, 0])
        expect = {i: int(read_shard_cells(shards_dir / e["name"]).joinids.sum())
                  for i, e in enumerate(read_manifest(shards_dir)["shards"][:3])}
        assert all(r == expect for r in results)
        assert sorted(log.read_text().split()) == ["0", "1", "2"]
        cache = SharedShardCache(root, None, ShardCells, ShardError)
        cache.release(1)
        assert not list(root.glob("000001.*")) and list(root.glob("000000.*"))
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_bad_shard_verdict_reaches_every_process(tiny_shards, tmp_path):
    import shutil

    src, _ = tiny_shards
    shards_dir = tmp_path / "shards"
    shutil.copytree(src, shards_dir)
    name = read_manifest(shards_dir)["shards"][2]["name"]
    data = (shards_dir / name).read_bytes()
    (shards_dir / name).write_bytes(data[: len(data) // 3])
    root, log = make_cache_dir(min_free_bytes=0), tmp_path / "decodes.log"
    try:
        results = run_workers(root, shards_dir, log, [2])
        assert all(name in r[2] and "sha256" in r[2] for r in results)
        assert log.read_text().split() == ["2"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_loader_removes_its_cache_dir(tiny_shards):
    shards_dir, _ = tiny_shards
    before = {p for p in Path("/dev/shm").glob("celljepa-loader-*")} if Path("/dev/shm").is_dir() else set()
    cfg = LoaderConfig(shards_dir=str(shards_dir), batch_size=8, max_genes=40, num_workers=2)
    loader, n = build_loader(cfg, 0, 1, 0)
    assert sum(1 for _ in loader) == n
    for i, _ in enumerate(loader):  # abandoned mid-epoch
        if i == 3:
            break
    after = {p for p in Path("/dev/shm").glob("celljepa-loader-*")} if Path("/dev/shm").is_dir() else set()
    assert after <= before


def test_dirs_of_killed_jobs_are_removed(tmp_path):
    import subprocess
    import sys

    from celljepa_dist.data.shard_cache import PREFIX, _pid_namespace, remove_stale_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ns = _pid_namespace()
    stale = tmp_path / f"{PREFIX}{ns}-{int(dead.stdout)}-abcd1234"
    live = tmp_path / f"{PREFIX}{ns}-{os.getpid()}-abcd1234"
    other_ns = tmp_path / f"{PREFIX}999{ns}-{int(dead.stdout)}-abcd1234"  # another container's
    for d in (stale, live, other_ns):
        d.mkdir()
        (d / "000001.genes.npy").write_bytes(b"x")
    remove_stale_dirs(tmp_path)
    assert not stale.exists() and live.exists() and other_ns.exists()
