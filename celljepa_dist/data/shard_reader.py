"""Reading one shard for the loader: through webdataset's tar iterators, checked against the
manifest (sha256, cell count), keeping only what batches need (no raw counts).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.tariterators import meta_prefix as _META_PREFIX, meta_suffix as _META_SUFFIX

_NEEDED = ("offsets.npy", "genes.npy", "bins.npy", "joinids.npy", "meta.json")  # counts are not read
_DTYPES = {"offsets.npy": np.int64, "genes.npy": np.int32, "bins.npy": np.uint8, "joinids.npy": np.int64}


class ShardError(ValueError):
    """A shard could not be read; the message names the file."""


@dataclass
class ShardCells:
    """The parts of a shard the loader needs (no raw counts)."""

    offsets: np.ndarray
    genes: np.ndarray
    bins: np.ndarray
    joinids: np.ndarray
    labels: np.ndarray


def _npy_view(data: bytes | memoryview) -> np.ndarray:
    """A read-only array over the bytes of a .npy member (np.load would copy them once more)."""
    head = bytes(data[:12])  # magic (6), version (2), header length (2 in v1, 4 in v2+)
    hlen = 2 + int.from_bytes(head[8:10], "little") if head[6:7] == b"\x01" else 4 + int.from_bytes(head[8:12], "little")
    f = io.BytesIO(bytes(data[: 8 + hlen]))  # just the header: the data is viewed, not copied
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran or dtype.hasobject:
        raise ValueError("not a plain C-order numeric array")
    count = int(np.prod(shape))
    if len(data) - f.tell() != count * dtype.itemsize:
        raise ValueError(f"{len(data) - f.tell()} data bytes for {count} items of {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=f.tell()).reshape(shape)


def _decode(sample: dict, where: str) -> tuple:
    key = sample.get("__key__")
    missing = [m for m in _NEEDED if m not in sample]
    if missing:
        raise ShardError(f"{where}: block {key} lacks members {missing}")
    arrays = []
    for member, dtype in _DTYPES.items():
        try:
            arr = _npy_view(sample[member])
        except Exception as e:
            raise ShardError(f"{where}: block {key} member {member} does not decode ({e})") from None
        if arr.dtype != dtype or arr.ndim != 1:
            raise ShardError(f"{where}: block {key} member {member} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        arrays.append(arr)
    offsets, genes, bins, joinids = arrays
    if len(offsets) != len(joinids) + 1 or offsets[0] != 0 or offsets[-1] != len(genes) or len(genes) != len(bins):
        raise ShardError(f"{where}: block {key} offsets disagree with its gene arrays")
    try:
        meta = json.loads(bytes(sample["meta.json"]))
    except Exception as e:
        raise ShardError(f"{where}: block {key} meta.json does not decode ({e})") from None
    label = meta.get("label")
    labels = np.full(len(joinids), -1, np.int64) if label is None else np.array(
        [-1 if x is None else int(x) for x in label], dtype=np.int64)
    if len(labels) != len(joinids):
        raise ShardError(f"{where}: block {key} has {len(labels)} labels for {len(joinids)} cells")
    return offsets, genes, bins, joinids, labels


def read_shard_cells(path: str | Path, expected_sha256: str | None = None, expected_cells: int | None = None) -> ShardCells:
    """Read one shard with webdataset's tar iterators; verify sha256 and cell count when given.

    The file is read in one call and hashed in one call (in a thread, while the tar is parsed):
    tarfile's stream mode (what webdataset uses) reads 10 KiB at a time, and hashing those pieces
    one by one costs ~4x more. Members are parsed in place (memoryviews into the file's bytes,
    `_members_in_memory`) and fed to webdataset's group_by_keys; a tar that path does not mirror
    exactly goes through webdataset's own tar iterators, which give the verdict.
    """
    path = Path(path)
    where = f"shard {path}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{where}: cannot be read ({e})") from None
    digest: list[str] = []
    hasher = None
    if expected_sha256 is not None:  # hashed in a thread (hashlib releases the GIL) while the tar is parsed
        hasher = threading.Thread(target=lambda d=data: digest.append(hashlib.sha256(d).hexdigest()),
                                  name="shard-sha256", daemon=True)
        hasher.start()
    cells = error = None
    try:
        cells = _parse_cells(data, path, where)
    except ShardError as e:
        error = e
    finally:
        if hasher is not None:
            hasher.join()
    if expected_sha256 is not None:  # a checksum mismatch is reported before any other fault
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


def _parse_cells(data: bytes, path: Path, where: str) -> ShardCells:
    try:
        parts = [_decode(sample, where) for sample in group_by_keys(_members_in_memory(data, str(path)))]
    except Exception:  # anything unusual: webdataset's own reading below, with its exact verdict
        parts = None
    if parts is None:
        parts = _read_with_webdataset(data, path, where)
    sizes = [int(p[0][-1]) for p in parts]
    shifts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    offsets = np.concatenate([[0]] + [p[0][1:] + s for p, s in zip(parts, shifts)]).astype(np.int64)
    return ShardCells(offsets, *(np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, dt)
                                 for i, dt in ((1, np.int32), (2, np.uint8), (3, np.int64), (4, np.int64))))


def _members_in_memory(data: bytes, url: str):
    """What webdataset's tar_file_expander yields for this tar (same filters, same end marker),
    with each member's data a memoryview into `data` instead of a copy read 10 KiB at a time.

    The headers are parsed by tarfile in random-access mode, which seeks over the data. Raises on
    anything this does not mirror exactly (compression, sparse or continued members, data past
    the end), so the caller falls back to webdataset's reading.
    """
    view = memoryview(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            fname = info.name
            if not info.isreg() or fname is None:
                continue
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
                raise ValueError("member type not mirrored")
            if "/" not in fname and fname.startswith(_META_PREFIX) and fname.endswith(_META_SUFFIX):
                continue
            if re.match(r"__[^/]*__($|/)", fname):  # webdataset's skip_meta
                continue
            if fname.endswith("counts.npy"):  # select_files
                continue
            if info.offset_data + info.size > len(data):
                raise ValueError("member data past the end")
            yield {"fname": fname, "data": view[info.offset_data : info.offset_data + info.size], "__url__": url}
    yield {}  # tar_file_expander's end-of-shard marker


def _read_with_webdataset(data: bytes, path: Path, where: str) -> list:
    parts = []
    try:
        source = [{"url": str(path), "stream": io.BytesIO(data)}]
        members = tar_file_expander(source, select_files=lambda name: not name.endswith("counts.npy"))
        for sample in group_by_keys(members):
            parts.append(_decode(sample, where))
    except ShardError:
        raise
    except Exception as e:  # tarfile and EOF errors; webdataset re-raises them with extra args
        detail = str(e.args[0] if e.args else e).split(" @ <")[0]  # drop webdataset's stream repr
        raise ShardError(f"{where}: unreadable or truncated tar ({type(e).__name__}: {detail})") from None
    return parts
