"""Shard format: cells packed in blocks inside plain POSIX tars, plus a manifest with checksums.

One webdataset sample = one block of up to `block_size` cells (per-sample overhead dominates at
cell scale). Sample key "{block:05d}"; members (docs/ARCHITECTURE.md, docs/data.md):
  offsets.npy int64 [n+1]  CSR row pointer | genes.npy int32 [nnz] vocab ids, ascending per cell
  bins.npy uint8 [nnz]      quantile bins  | counts.npy float32 [nnz] raw counts
  joinids.npy int64 [n]     soma_joinid    | meta.json {"cell_type": [...], ...} (lists of length n)
Tars are byte-reproducible (fixed mtime/uid/names, np.save headers) and written to a temp name,
fsynced, then renamed, so a shard under its final name is always complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from celljepa_dist.atomic import atomic_write_bytes, read_json

SHARD_FORMAT = "celljepa-shards/1"
MANIFEST_NAME = "manifest.json"
ARRAY_FIELDS = {"offsets": np.int64, "genes": np.int32, "bins": np.uint8, "counts": np.float32, "joinids": np.int64}
MEMBER_SUFFIXES = tuple(f"{k}.npy" for k in ARRAY_FIELDS) + ("meta.json",)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class CellBlock:
    """A run of cells in CSR form: the in-memory twin of a block (or a whole shard)."""
    offsets: np.ndarray
    genes: np.ndarray
    bins: np.ndarray
    counts: np.ndarray
    joinids: np.ndarray
    meta: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.joinids)

    def validate(self, where: str = "block") -> None:
        n = len(self.joinids)
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0:
            raise ValueError(f"{where}: offsets must have n_cells + 1 = {n + 1} entries starting at 0")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"{where}: offsets decrease")
        nnz = int(self.offsets[-1])
        for name in ("genes", "bins", "counts"):
            if len(getattr(self, name)) != nnz:
                raise ValueError(f"{where}: {name} has {len(getattr(self, name))} entries, offsets say {nnz}")
        for key, values in self.meta.items():
            if len(values) != n:
                raise ValueError(f"{where}: meta[{key!r}] has {len(values)} entries for {n} cells")

    def cell(self, i: int) -> dict:
        a, b = self.offsets[i], self.offsets[i + 1]
        out = {"joinid": int(self.joinids[i]), "genes": self.genes[a:b], "bins": self.bins[a:b],
               "counts": self.counts[a:b]}
        out.update({k: v[i] for k, v in self.meta.items()})
        return out

    def slice(self, start: int, stop: int) -> "CellBlock":
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return CellBlock(self.offsets[start:stop + 1] - a, self.genes[a:b], self.bins[a:b], self.counts[a:b],
                         self.joinids[start:stop], {k: list(v[start:stop]) for k, v in self.meta.items()})

    @staticmethod
    def concat(blocks: list["CellBlock"]) -> "CellBlock":
        if not blocks:
            return empty_block()
        sizes = np.array([int(b.offsets[-1]) for b in blocks], dtype=np.int64)
        shifts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        offsets = np.concatenate([[0]] + [b.offsets[1:] + s for b, s in zip(blocks, shifts)]).astype(np.int64)
        keys = list(blocks[0].meta)
        return CellBlock(offsets, *(np.concatenate([getattr(b, f) for b in blocks])
                                    for f in ("genes", "bins", "counts", "joinids")),
                         {k: [x for b in blocks for x in b.meta[k]] for k in keys})


def empty_block(meta_keys: Iterable[str] = ()) -> CellBlock:
    return CellBlock(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8),
                     np.zeros(0, np.float32), np.zeros(0, np.int64), {k: [] for k in meta_keys})


# --- encoding ----------------------------------------------------------------------------------

def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_block(block: CellBlock) -> dict[str, bytes]:
    """Member suffix -> bytes for one block (what goes into the tar under one sample key)."""
    members = {f"{name}.npy": _npy_bytes(np.asarray(getattr(block, name), dtype=dt))
               for name, dt in ARRAY_FIELDS.items()}
    members["meta.json"] = json.dumps(block.meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return members


def decode_block(sample: Mapping[str, object], where: str = "sample") -> CellBlock:
    """Inverse of encode_block. Accepts raw bytes or values webdataset already decoded; keys may
    carry a leading dot (webdataset style, '.genes.npy') or not."""
    fields = {}
    norm = {str(k).lstrip("."): v for k, v in sample.items()}
    for name, dt in ARRAY_FIELDS.items():
        key = f"{name}.npy"
        if key not in norm:
            raise ValueError(f"{where}: member {key} missing")
        value = norm[key]
        if isinstance(value, (bytes, bytearray)):
            try:
                value = np.load(io.BytesIO(value), allow_pickle=False)
            except Exception as e:
                raise ValueError(f"{where}: member {key} is not a valid .npy ({e})") from None
        arr = np.asarray(value)
        if arr.dtype != dt:
            raise ValueError(f"{where}: member {key} has dtype {arr.dtype}, expected {np.dtype(dt)}")
        fields[name] = arr
    meta = norm.get("meta.json")
    if meta is None:
        raise ValueError(f"{where}: member meta.json missing")
    if isinstance(meta, (bytes, bytearray)):
        try:
            meta = json.loads(meta.decode("utf-8"))
        except Exception as e:
            raise ValueError(f"{where}: member meta.json is not valid JSON ({e})") from None
    block = CellBlock(meta=dict(meta), **fields)
    block.validate(where)
    return block


# --- tar writing and reading -----------------------------------------------------------------

class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes every byte on its way to disk (no second read pass)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(path: str | os.PathLike, cells: CellBlock, block_size: int = 1024) -> dict:
    """Write `cells` as one shard atomically; returns its manifest entry {name, cells, sha256}."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    path = Path(path)
    cells.validate(f"shard {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            hw = _HashingWriter(f)
            with tarfile.open(fileobj=hw, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for b, start in enumerate(range(0, len(cells), block_size)):
                    block = cells.slice(start, min(start + block_size, len(cells)))
                    for suffix, data in encode_block(block).items():
                        tar.addfile(_tarinfo(f"{b:05d}.{suffix}", len(data)), io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
            digest = hw.sha.hexdigest()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"name": path.name, "cells": len(cells), "sha256": digest}


def iter_shard_blocks(path: str | os.PathLike):
    """Yield (key, CellBlock) for each block of a shard, in file order; errors name the shard."""
    path = Path(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            current, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                key, _, suffix = info.name.partition(".")
                if suffix not in MEMBER_SUFFIXES:
                    raise ValueError(f"shard {path}: unexpected member {info.name!r}")
                if key != current and current is not None:
                    yield current, decode_block(members, f"shard {path} block {current}")
                    members = {}
                current = key
                members[suffix] = tar.extractfile(info).read()
            if current is not None:
                yield current, decode_block(members, f"shard {path} block {current}")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"shard {path}: unreadable or truncated tar ({type(e).__name__}: {e})") from None


def read_shard(path: str | os.PathLike) -> CellBlock:
    """The whole shard as one CellBlock (offsets rebased)."""
    return CellBlock.concat([b for _, b in iter_shard_blocks(path)])


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


# --- manifest --------------------------------------------------------------------------------

MANIFEST_KEYS = ("format", "total_cells", "vocab_sha256", "binning", "source", "skipped", "shards")


def manifest_bytes(manifest: dict) -> bytes:
    # Sorted keys and fixed layout: the same content always gives the same bytes (idempotent jobs).
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(shards_dir: str | os.PathLike, manifest: dict, name: str = MANIFEST_NAME) -> Path:
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest for {shards_dir} lacks keys {missing}")
    path = Path(shards_dir) / name
    atomic_write_bytes(path, manifest_bytes(manifest))
    return path


def read_manifest(shards_dir_or_file: str | os.PathLike) -> dict:
    path = Path(shards_dir_or_file)
    if path.is_dir():
        path = path / MANIFEST_NAME
    manifest = read_json(path, "manifest")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest {path} lacks keys {missing}")
    if manifest["format"] != SHARD_FORMAT:
        raise ValueError(f"manifest {path}: unknown format {manifest['format']!r}, expected {SHARD_FORMAT!r}")
    if sum(s["cells"] for s in manifest["shards"]) != manifest["total_cells"]:
        raise ValueError(f"manifest {path}: shard cell counts do not sum to total_cells")
    return manifest


def check_vocab_hash(manifest: dict, vocab_sha256: str, where: str = "manifest") -> None:
    if manifest["vocab_sha256"] != vocab_sha256:
        raise ValueError(f"{where} was built with vocab sha256 {manifest['vocab_sha256'][:12]}..., "
                         f"but the vocab given has {vocab_sha256[:12]}...: rebuild the shards or pass the right vocab")


def build_manifest(shards: list[dict], vocab_sha256: str, n_bins: int, source: dict,
                   skipped: dict | None = None, **extra) -> dict:
    """A complete manifest from shard entries in global order; `extra` adds keys (e.g. labels)."""
    from .binning import BINNING_RULE

    manifest = {
        "format": SHARD_FORMAT,
        "total_cells": int(sum(s["cells"] for s in shards)),
        "vocab_sha256": vocab_sha256,
        "binning": {"n_bins": int(n_bins), "rule": BINNING_RULE},
        "source": source,
        "skipped": dict(skipped or {}),
        "shards": list(shards),
    }
    manifest.update(extra)
    return manifest


def validate_shards(shards_dir: str | os.PathLike, vocab_sha256: str | None = None,
                    vocab_size: int | None = None, n_special: int = 3) -> list[str]:
    """Check every shard against the manifest; returns faults (empty list: all good), each naming
    the shard and what is wrong."""
    shards_dir = Path(shards_dir)
    try:
        manifest = read_manifest(shards_dir)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    faults = []
    if vocab_sha256 is not None and manifest["vocab_sha256"] != vocab_sha256:
        faults.append(f"{MANIFEST_NAME}: vocab sha256 {manifest['vocab_sha256'][:12]}... differs from the vocab "
                      f"given ({vocab_sha256[:12]}...)")
    from .binning import BINNING_RULE, bin_csr

    n_bins = manifest["binning"]["n_bins"]
    binning_rule = manifest["binning"].get("rule")
    for entry in manifest["shards"]:
        path = shards_dir / entry["name"]
        if not path.exists():
            faults.append(f"{entry['name']}: missing")
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            faults.append(f"{entry['name']}: sha256 {digest[:12]}... != manifest {entry['sha256'][:12]}...")
        try:
            cells = read_shard(path)
        except ValueError as e:
            faults.append(str(e))
            continue
        if len(cells) != entry["cells"]:
            faults.append(f"{entry['name']}: {len(cells)} cells, manifest says {entry['cells']}")
        if len(cells.bins) and (cells.bins.min() < 1 or cells.bins.max() > n_bins - 1):
            faults.append(f"{entry['name']}: bins outside 1..{n_bins - 1} ({cells.bins.min()}..{cells.bins.max()})")
        if len(cells.genes) and cells.genes.min() < n_special:
            faults.append(f"{entry['name']}: gene id {cells.genes.min()} is a special token")
        if vocab_size is not None and len(cells.genes) and cells.genes.max() >= vocab_size:
            faults.append(f"{entry['name']}: gene id {cells.genes.max()} >= vocab size {vocab_size}")
        if np.any(np.diff(cells.offsets) == 0):
            faults.append(f"{entry['name']}: holds a cell with no expressed gene")
            continue
        step = np.diff(cells.genes.astype(np.int64))
        if len(step):
            step[cells.offsets[1:-1] - 1] = 1  # row boundaries may step down
            if (step <= 0).any():
                faults.append(f"{entry['name']}: gene ids not strictly ascending within a cell")
        if len(cells.counts) and not (np.isfinite(cells.counts).all() and (cells.counts > 0).all()):
            faults.append(f"{entry['name']}: counts must be finite and > 0")
        elif binning_rule == BINNING_RULE and not np.array_equal(cells.bins, bin_csr(cells.offsets, cells.counts, n_bins)):
            faults.append(f"{entry['name']}: bins do not follow {BINNING_RULE} for the stored counts")
        if np.any(np.diff(cells.joinids) <= 0):
            faults.append(f"{entry['name']}: joinids not strictly ascending")
    return faults
