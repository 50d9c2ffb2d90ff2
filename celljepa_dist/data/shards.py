"""Shard format: cells packed in blocks inside plain POSIX tars, plus a manifest with checksums.

One webdataset sample = one block of up to `block_size` cells (per-sample overhead dominates at
cell scale). Sample key "{block:05d}"; members (docs/ARCHITECTURE.md, docs/data.md):
  offsets.npy int64 [n+1]  CSR row pointer | genes.npy int32 [nnz] vocab ids, ascending per cell
  bins.npy uint8 [nnz]      quantile bins  | counts.npy float32 [nnz] raw counts
  joinids.npy int64 [n]     soma_joinid    | meta.json {"cell_type": [...], ...} (lists of length n)
Tars are byte-reproducible (fixed mtime/uid/names, np.save headers) and written to a temp name,
fsynced, then renamed, so a shard under its final name is always complete.
Reading is `shard_reader.py` (read_shard and iter_shard_blocks here delegate to it); every
reading fault is a ShardError naming the shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from celljepa_dist.atomic import atomic_write_bytes, publish, read_json, temp_path_beside
from celljepa_dist.tokens import N_SPECIAL

SHARD_FORMAT = "celljepa-shards/1"
MANIFEST_NAME = "manifest.json"
# What the shard-building job (build.py) leaves beside the shards, read back by validate_shards:
# the settings and filtered cell count it built with, and one record per finished shard.
BUILD_SETTINGS = "build.json"
BUILD_PARTS_DIR = ".parts"
ARRAY_FIELDS = {"offsets": np.int64, "genes": np.int32, "bins": np.uint8, "counts": np.float32, "joinids": np.int64}
MEMBER_SUFFIXES = tuple(f"{k}.npy" for k in ARRAY_FIELDS) + ("meta.json",)


class ShardError(ValueError):
    """A shard could not be read or decoded; the message names the file (and block, member)."""


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
        return CellBlock(join_offsets([b.offsets for b in blocks]), *(np.concatenate([getattr(b, f) for b in blocks])
                                                   for f in ("genes", "bins", "counts", "joinids")),
                         joined_meta(blocks, list(blocks[0].meta)))


def join_offsets(offsets: Sequence[np.ndarray]) -> np.ndarray:
    """The int64 CSR row pointer of several CSR runs' rows one after another (each run's own row
    pointer starts at 0). The one place the system joins row pointers."""
    shifts = np.cumsum([0] + [int(o[-1]) for o in offsets[:-1]])
    return np.concatenate([[0]] + [o[1:] + s for o, s in zip(offsets, shifts)]).astype(np.int64)


def joined_meta(blocks: list[CellBlock], keys: Iterable[str]) -> dict[str, list]:
    return {k: [x for b in blocks for x in b.meta[k]] for k in keys}


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


def npy_view(data: bytes | memoryview) -> np.ndarray:
    """A read-only 1-D array over the bytes of a .npy member (np.load would copy them once more).
    Raises ValueError unless they hold exactly one plain C-order 1-D numeric array."""
    head = bytes(data[:12])  # magic (6), version (2), header length (2 in v1, 4 in v2+)
    hlen = 2 + int.from_bytes(head[8:10], "little") if head[6:7] == b"\x01" else 4 + int.from_bytes(head[8:12], "little")
    f = io.BytesIO(bytes(data[: 8 + hlen]))  # just the header: the data is viewed, not copied
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran or dtype.hasobject or len(shape) != 1:
        raise ValueError("not a plain C-order 1-D numeric array")
    count = int(np.prod(shape))
    if len(data) - f.tell() != count * dtype.itemsize:
        raise ValueError(f"{len(data) - f.tell()} data bytes for {count} items of {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())


def decode_block(sample: Mapping[str, object], where: str = "sample") -> CellBlock:
    """Inverse of encode_block; the one decoder of a block, for every reader. Accepts raw bytes
    (viewed, not copied: the arrays are read-only) or values webdataset already decoded; keys may
    carry a leading dot (webdataset style, '.genes.npy') or not; `__key__`-style entries are
    ignored, any other member is an error. Raises ShardError naming `where` and the member."""
    norm = {str(k).lstrip("."): v for k, v in sample.items() if not str(k).startswith("__")}
    unexpected = sorted(set(norm) - set(MEMBER_SUFFIXES))
    if unexpected:
        raise ShardError(f"{where}: unexpected members {unexpected}")
    fields = {}
    for name, dt in ARRAY_FIELDS.items():
        key = f"{name}.npy"
        if key not in norm:
            raise ShardError(f"{where}: member {key} missing")
        value = norm[key]
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                value = npy_view(value)
            except Exception as e:
                raise ShardError(f"{where}: member {key} is not a valid .npy ({e})") from None
        arr = np.asarray(value)
        if arr.dtype != dt or arr.ndim != 1:
            raise ShardError(f"{where}: member {key} has dtype {arr.dtype} and {arr.ndim} dims, "
                             f"expected 1-D {np.dtype(dt)}")
        fields[name] = arr
    meta = norm.get("meta.json")
    if meta is None:
        raise ShardError(f"{where}: member meta.json missing")
    if isinstance(meta, (bytes, bytearray, memoryview)):
        try:
            meta = json.loads(bytes(meta).decode("utf-8"))
        except Exception as e:
            raise ShardError(f"{where}: member meta.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not all(isinstance(v, list) for v in meta.values()):
        raise ShardError(f"{where}: member meta.json is not an object of lists")
    block = CellBlock(meta=dict(meta), **fields)
    try:
        block.validate(where)
    except ValueError as e:
        raise ShardError(str(e)) from None
    return block


# --- tar writing and reading -----------------------------------------------------------------

def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tar_header(name: str, size: int) -> bytes:
    # Exactly what tarfile.TarFile.addfile writes for this member (USTAR, utf-8).
    return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    # np.save's header for a 1-D C-ordered array (format 1.0, which np.save picks for such shapes).
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": (int(length),)})
    return buf.getvalue()


class ShardWriter:
    """Streams cells into one shard: a block of `block_size` cells goes to disk as soon as it is
    complete, each array written straight from its buffer and hashed on the way (no npy or tar
    staging copies, no whole-shard concatenation). Cells may arrive in pieces of any size.

    The bytes are those of Python's tarfile ("w|", USTAR) holding np.save members, which the tests
    check against; tars are byte-reproducible (fixed mtime/uid/names). Use as a context manager:
    a clean exit fsyncs the temp file and renames it to `path` (`entry` then holds its manifest
    entry); an exception removes it, so a shard under its final name is always complete."""

    def __init__(self, path: str | os.PathLike, block_size: int = 1024):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.path, self.block_size = Path(path), block_size
        self._tmp = temp_path_beside(self.path)
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._pending: list[CellBlock] = []
        self._n_pending = 0
        self._blocks = 0
        self._meta_keys: list[str] | None = None
        self.cells = 0
        self.entry: dict | None = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, cells: CellBlock) -> None:
        """Append cells (validated); full blocks are written now, the rest waits for more or close."""
        cells.validate(f"shard {self.path.name}")
        keys = sorted(cells.meta)
        if self._meta_keys is None:
            self._meta_keys = keys
        elif keys != self._meta_keys:
            raise ValueError(f"shard {self.path.name}: cells carry meta keys {keys}, earlier ones {self._meta_keys}")
        if len(cells):
            self._pending.append(cells)
            self._n_pending += len(cells)
        while self._n_pending >= self.block_size:
            self._write_block(self._take(self.block_size))

    def close(self) -> dict:
        try:
            if self._n_pending:
                self._write_block(self._take(self._n_pending))
            # End of archive (two zero blocks), padded to whole records, as tarfile does.
            self._write(bytes(2 * tarfile.BLOCKSIZE))
            self._write(bytes(-self._bytes % tarfile.RECORDSIZE))
            self._file.flush()
            os.fsync(self._file.fileno())  # durable before the rename
            self._file.close()
            publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.entry = {"name": self.path.name, "cells": self.cells, "sha256": self._sha.hexdigest()}
        return self.entry

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def _take(self, n: int) -> list[CellBlock]:
        """The next n pending cells as a list of pieces (views; the last piece may be split)."""
        pieces, need = [], n
        while need:
            head = self._pending[0]
            if len(head) <= need:
                pieces.append(self._pending.pop(0))
                need -= len(head)
            else:
                pieces.append(head.slice(0, need))
                self._pending[0] = head.slice(need, len(head))
                need = 0
        self._n_pending -= n
        return pieces

    def _write(self, buf) -> None:
        view = memoryview(buf).cast("B")
        self._sha.update(view)
        self._file.write(view)
        self._bytes += view.nbytes

    def _member(self, name: str, parts: list) -> None:
        size = sum(memoryview(p).nbytes for p in parts)
        self._write(_tar_header(name, size))
        for part in parts:
            if len(part):
                self._write(part)
        self._write(bytes(-size % tarfile.BLOCKSIZE))

    def _write_block(self, pieces: list[CellBlock]) -> None:
        key = f"{self._blocks:05d}"
        for name, dtype in ARRAY_FIELDS.items():
            arrays = [join_offsets([p.offsets for p in pieces])] if name == "offsets" else \
                [np.ascontiguousarray(getattr(p, name), dtype=dtype) for p in pieces]
            length = sum(len(a) for a in arrays)
            self._member(f"{key}.{name}.npy", [_npy_header(dtype, length), *arrays])
        meta = joined_meta(pieces, self._meta_keys or [])
        self._member(f"{key}.meta.json", [json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")])
        self._blocks += 1
        self.cells += sum(len(p) for p in pieces)


def write_shard(path: str | os.PathLike, cells: CellBlock, block_size: int = 1024) -> dict:
    """Write `cells` as one shard atomically; returns its manifest entry {name, cells, sha256}."""
    with ShardWriter(path, block_size) as writer:
        writer.add(cells)
    return writer.entry


def iter_shard_blocks(path: str | os.PathLike):
    """Yield (key, CellBlock) for each block of a shard, in file order (shard_reader.py)."""
    from .shard_reader import iter_shard_blocks as iterate

    return iterate(path)


def read_shard(path: str | os.PathLike) -> CellBlock:
    """The whole shard as one CellBlock, offsets rebased (shard_reader.py); ShardError if bad."""
    from .shard_reader import read_shard as read

    return read(path)


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


def set_faults(shards_dir: Path, manifest: dict) -> list[str]:
    """Faults of the shard set as a whole: no cells; tars the manifest does not list; fewer cells
    or shards than the build (build.json, .parts/) made, i.e. a manifest edited after the build,
    so that training would silently use fewer cells."""
    faults = []
    listed = {entry["name"] for entry in manifest["shards"]}
    if manifest["total_cells"] == 0:
        faults.append(f"{MANIFEST_NAME}: 0 cells in {len(listed)} shards (nothing to train on)")
    for path in sorted(shards_dir.glob("*.tar")):
        if path.name not in listed:
            faults.append(f"{path.name}: in {shards_dir} but not listed in {MANIFEST_NAME}")
    for record in sorted((shards_dir / BUILD_PARTS_DIR).glob("*.tar.json")):
        name = record.name.removesuffix(".json")
        if name not in listed:
            faults.append(f"{name}: built (record {BUILD_PARTS_DIR}/{record.name}) but not listed in {MANIFEST_NAME}")
    settings = shards_dir / BUILD_SETTINGS
    if settings.exists():
        built = read_json(settings, "build settings")
        filtered, empty = int(built.get("filtered_cells", 0)), int(manifest["skipped"].get("empty_cells", 0))
        if manifest["total_cells"] < filtered - empty:
            faults.append(f"{MANIFEST_NAME}: total_cells {manifest['total_cells']} is below the build's "
                          f"{filtered - empty} ({BUILD_SETTINGS}: {filtered} filtered cells - {empty} empty): "
                          f"{filtered - empty - manifest['total_cells']} cells would not be trained on")
        n_built = -(-filtered // built["cells_per_shard"]) if built.get("cells_per_shard") else None
        if n_built is not None and len(manifest["shards"]) != n_built:
            faults.append(f"{MANIFEST_NAME}: lists {len(manifest['shards'])} shards, the build ({BUILD_SETTINGS}) "
                          f"made {n_built}")
    return faults


def validate_shards(shards_dir: str | os.PathLike, vocab_sha256: str | None = None,
                    vocab_size: int | None = None, n_special: int = N_SPECIAL) -> list[str]:
    """Check every shard against the manifest; returns faults (empty list: all good), each naming
    the shard and what is wrong."""
    shards_dir = Path(shards_dir)
    try:
        manifest = read_manifest(shards_dir)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    faults = set_faults(shards_dir, manifest)
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
