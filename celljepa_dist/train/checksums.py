"""Checksums of a checkpoint's files: recorded at commit, verified before a resume or an export.

`CHECKSUMS.json` in a checkpoint dir lists every file of it (path relative to the dir, size,
sha256), written by rank 0 before the COMMITTED marker. A committed checkpoint whose file is
missing, shorter or altered is therefore detected by name instead of surfacing as torch's
"failed finding central directory" deep inside a load.

Who hashes what: each rank hashes the files it wrote itself (DeepSpeed and this project name
per-rank files by data-parallel rank: `zero_pp_rank_R_...`, `rank_R.pt`, `shard_rankRRR.pt`),
rank 0 everything else, and writes `checksums_rank_R.json`; after a barrier rank 0 merges them.
So the files are read once more in total, spread over the ranks (sha256 runs at ~2 GB/s with the
CPU's SHA extensions), and each rank reads what is still in its own page cache. Verification
splits the files the same way: one read of the checkpoint in total.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from celljepa_dist.atomic import atomic_write_text

CHECKSUMS_FILE = "CHECKSUMS.json"
FORMAT = "celljepa-checksums/1"
_SHARE_PREFIX = "checksums_rank_"
# Per-rank files by name: DeepSpeed's ZeRO partitions, our rank_R.pt and ZeRO-3 teacher shards.
_RANK_OF_NAME = (re.compile(r"^rank_(\d+)\.pt$"), re.compile(r"zero_pp_rank_(\d+)_"),
                 re.compile(r"^shard_rank(\d+)\.pt$"))


def _not_hashed(name: str, marker: str) -> bool:
    """The marker, the manifests themselves and temp files of atomic writes (`.NAME.*.tmp`)."""
    return name in (marker, CHECKSUMS_FILE) or name.startswith((_SHARE_PREFIX, "."))


def checkpoint_files(d: Path, marker: str = "COMMITTED") -> list[str]:
    """Every file of checkpoint dir `d` that the manifest covers, as sorted relative paths."""
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                  if p.is_file() and not _not_hashed(p.name, marker))


def owner_of(relpath: str, world_size: int) -> int:
    """The rank that hashes (and verifies) a file: the rank its name carries, else rank 0."""
    name = relpath.rsplit("/", 1)[-1]
    for pattern in _RANK_OF_NAME:
        m = pattern.search(name)
        if m:
            return int(m.group(1)) % world_size
    return 0


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _entry(d: Path, rel: str) -> dict:
    path = d / rel
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def _share_path(d: Path, rank: int) -> Path:
    return d / f"{_SHARE_PREFIX}{rank}.json"


def record_share(d: Path, rank: int, world_size: int) -> None:
    """This rank hashes the files it owns into `checksums_rank_R.json` (after every rank's save)."""
    files = {rel: _entry(d, rel) for rel in checkpoint_files(d) if owner_of(rel, world_size) == rank}
    atomic_write_text(_share_path(d, rank), json.dumps(files), fsync=False)  # merged and fsynced by rank 0


def merge_shares(d: Path, world_size: int) -> None:
    """Rank 0, after every rank's `record_share`: one `CHECKSUMS.json` covering every file."""
    files: dict[str, dict] = {}
    for rank in range(world_size):
        files.update(json.loads(_share_path(d, rank).read_text()))
    for rel in checkpoint_files(d):  # a file no share covers (none expected): hash it here
        if rel not in files:
            files[rel] = _entry(d, rel)
    atomic_write_text(d / CHECKSUMS_FILE, json.dumps({"format": FORMAT, "algorithm": "sha256",
                                                      "files": dict(sorted(files.items()))}, indent=1))
    for rank in range(world_size):
        _share_path(d, rank).unlink()


def read_manifest(d: Path) -> dict | None:
    """The checkpoint's recorded checksums, None for a checkpoint written before they existed."""
    path = d / CHECKSUMS_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        return manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        return {CHECKSUMS_FILE: {"unreadable": f"{type(err).__name__}: {err}"}}


def _problem(d: Path, rel: str, expected: dict) -> str | None:
    if "unreadable" in expected:
        return f"{rel}: unreadable ({expected['unreadable']})"
    path = d / rel
    if not path.is_file():
        return f"{rel}: missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{rel}: size mismatch (expected {expected['size']} bytes, found {size}: truncated or overwritten)"
    found = file_digest(path)
    if found != expected["sha256"]:
        return f"{rel}: checksum mismatch (expected sha256 {expected['sha256'][:16]}..., found {found[:16]}...)"
    return None


def verify_share(d: Path, rank: int = 0, world_size: int = 1) -> list[str] | None:
    """Problems with the files of `d` that this rank owns (all of them for world_size 1), one line
    per file naming it; None when `d` has no checksums (written before they were recorded)."""
    manifest = read_manifest(d)
    if manifest is None:
        return None
    problems = [_problem(d, rel, expected) for rel, expected in manifest.items()
                if owner_of(rel, world_size) == rank]
    return [p for p in problems if p is not None]
