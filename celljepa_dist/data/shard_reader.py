"""The one reader of the shard format (`shards.py` writes it and decodes one block).

    read_shard_cells(path, sha256, cells) -> ShardCells   the loader's part, checked against the manifest
    read_shard(path) -> CellBlock, iter_shard_blocks(path)  whole blocks (shards.py delegates here)

A shard is read in one call. Its members are listed as webdataset's tar iterators list them (same
filters, then webdataset's group_by_keys) by one of two listers:

    IN_MEMORY   tarfile in random-access mode over the bytes already read, each member's data a
                memoryview into them: no 10 KiB-at-a-time copies (the fast path);
    WEBDATASET  webdataset's own tar_file_expander over the bytes (the reference).

`list_samples` takes IN_MEMORY, and WEBDATASET only where IN_MEMORY does not mirror the tar
exactly (compression, sparse or continued members, data past the end, ...): WEBDATASET's
verdict is then the one given, and when it reads the tar a warning names the shard and why the
fast path was not taken (never silently). Every block is decoded by `shards.decode_block`.
Every fault is a `ShardError` (a ValueError) naming the shard (and block and member).
"""
from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.tariterators import meta_prefix as _META_PREFIX
from webdataset.tariterators import meta_suffix as _META_SUFFIX

from .shards import CellBlock, ShardError, decode_block, join_offsets

__all__ = ["IN_MEMORY", "WEBDATASET", "ShardCells", "ShardError", "iter_shard_blocks", "list_samples",
           "read_shard", "read_shard_cells"]

IN_MEMORY, WEBDATASET = "in-memory", "webdataset"
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skip_meta


@dataclass
class ShardCells:
    """The parts of a shard the loader needs (no raw counts; labels -1 where unknown)."""

    offsets: np.ndarray
    genes: np.ndarray
    bins: np.ndarray
    joinids: np.ndarray
    labels: np.ndarray


# --- listing members ------------------------------------------------------------------------------

def _members_in_memory(data: bytes, url: str):
    """What webdataset's tar_file_expander yields for this tar (same filters, same end marker),
    with each member's data a memoryview into `data` instead of a copy.

    The headers are parsed by tarfile in random-access mode, which seeks over the data. Raises on
    anything this does not mirror exactly, so that the caller can use webdataset's reading.
    """
    view = memoryview(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            fname = info.name
            if not info.isreg() or fname is None:
                continue
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
                raise ValueError(f"member {fname!r} of type {info.type!r} not mirrored")
            if "/" not in fname and fname.startswith(_META_PREFIX) and fname.endswith(_META_SUFFIX):
                continue
            if _SKIP_META.match(fname):
                continue
            if info.offset_data + info.size > len(data):
                raise ValueError(f"member {fname!r} data past the end")
            yield {"fname": fname, "data": view[info.offset_data: info.offset_data + info.size], "__url__": url}
    yield {}  # tar_file_expander's end-of-shard marker


def _members_webdataset(data: bytes, url: str):
    return tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])


def _tar_error(e: Exception, where: str) -> ShardError:
    detail = str(e.args[0] if e.args else e).split(" @ <")[0]  # drop webdataset's stream repr
    return ShardError(f"{where}: unreadable or truncated tar ({type(e).__name__}: {detail})")


def list_samples(data: bytes, url: str, lister: str | None = None) -> tuple[list[dict], str]:
    """The tar's webdataset samples (group_by_keys over its members) and the lister that gave them.

    `lister=None`: IN_MEMORY, or WEBDATASET where IN_MEMORY fails (a warning says so when
    WEBDATASET then reads the tar). Naming a lister uses only that one; IN_MEMORY then raises its
    own exception as is. WEBDATASET's errors are ShardErrors naming `url`.
    """
    where = f"shard {url}"
    if lister in (None, IN_MEMORY):
        try:
            return list(group_by_keys(_members_in_memory(data, url))), IN_MEMORY
        except Exception as e:
            if lister == IN_MEMORY:
                raise
            reason = f"{type(e).__name__}: {e}"
    elif lister != WEBDATASET:
        raise ValueError(f"lister must be {IN_MEMORY!r}, {WEBDATASET!r} or None, got {lister!r}")
    try:
        samples = list(group_by_keys(_members_webdataset(data, url)))
    except Exception as e:  # tarfile and EOF errors; webdataset re-raises them with extra args
        raise _tar_error(e, where) from None
    if lister is None:
        warnings.warn(f"{where}: read with webdataset's tar iterators, the in-memory path does not "
                      f"mirror this tar ({reason})", RuntimeWarning, stacklevel=3)
    return samples, WEBDATASET


def decode_samples(samples: list[dict], url: str) -> list[tuple[str, CellBlock]]:
    return [(s["__key__"], decode_block(s, f"shard {url} block {s['__key__']}")) for s in samples]


# --- whole blocks ---------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ShardError(f"shard {path}: cannot be read ({e})") from None


def iter_shard_blocks(path: str | Path):
    """Yield (key, CellBlock) for each block of a shard, in file order (arrays read-only)."""
    path = Path(path)
    samples, _ = list_samples(_read_bytes(path), str(path))
    yield from decode_samples(samples, str(path))


def read_shard(path: str | Path) -> CellBlock:
    """The whole shard as one CellBlock (offsets rebased, arrays copies)."""
    return CellBlock.concat([b for _, b in iter_shard_blocks(path)])


# --- the loader's part ----------------------------------------------------------------------------

def block_labels(block: CellBlock, where: str) -> np.ndarray:
    """meta["label"] as int64 (-1 for None or absent)."""
    label = block.meta.get("label")
    if label is None:
        return np.full(len(block), -1, np.int64)
    try:
        return np.array([-1 if x is None else int(x) for x in label], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ShardError(f"{where}: meta label is not an integer ({e})") from None


def shard_cells(blocks: list[tuple[str, CellBlock]], url: str) -> ShardCells:
    """The loader's arrays of decoded blocks, joined (raw counts dropped)."""
    parts = [b for _, b in blocks]
    labels = [block_labels(b, f"shard {url} block {k}") for k, b in blocks]
    if not parts:
        return ShardCells(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8),
                          np.zeros(0, np.int64), np.zeros(0, np.int64))
    return ShardCells(join_offsets([b.offsets for b in parts]), *(np.concatenate([getattr(b, f) for b in parts])
                                                                 for f in ("genes", "bins", "joinids")),
                      np.concatenate(labels))


def read_shard_cells(path: str | Path, expected_sha256: str | None = None, expected_cells: int | None = None) -> ShardCells:
    """Read one shard for the loader; verify sha256 and cell count when given.

    The file is read in one call and hashed in one call, in a thread (hashlib releases the GIL)
    while the tar is parsed: tarfile's stream mode reads 10 KiB at a time, and hashing those pieces
    one by one costs ~4x more. A checksum mismatch is reported before any other fault.
    """
    path = Path(path)
    where = f"shard {path}"
    data = _read_bytes(path)
    digest: list[str] = []
    hasher = None
    if expected_sha256 is not None:
        hasher = threading.Thread(target=lambda d=data: digest.append(hashlib.sha256(d).hexdigest()),
                                  name="shard-sha256", daemon=True)
        hasher.start()
    cells = error = None
    try:
        samples, _ = list_samples(data, str(path))
        cells = shard_cells(decode_samples(samples, str(path)), str(path))
    except ShardError as e:
        error = e
    finally:
        if hasher is not None:
            hasher.join()
    if expected_sha256 is not None:
        actual = digest[0] if digest else hashlib.sha256(data).hexdigest()  # (the thread failed)
        if actual != expected_sha256:
            raise ShardError(f"{where}: sha256 {actual[:12]}... differs from the manifest's "
                             f"{expected_sha256[:12]}... (corrupt, truncated or replaced file)")
    del data
    if error is not None:
        raise error
    if expected_cells is not None and len(cells.joinids) != expected_cells:
        raise ShardError(f"{where}: holds {len(cells.joinids)} cells, the manifest says {expected_cells}")
    return cells
