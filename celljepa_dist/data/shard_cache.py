"""Decoded shards ready before they are needed: ReadAhead (one background read per shard, for a
lone reader) and SharedShardCache (shared by one rank's DataLoader workers through memory-backed
files, read ahead with the same ReadAhead).

Every worker builds batches from the same shards (a shard holds hundreds of batches and the
workers take turns), so without sharing each shard would be read, checked and decoded once per
worker. Here the first worker to need a shard takes its lock file (O_EXCL), decodes it and
publishes the arrays as .npy files; the others memory-map them. A bad shard is published as a
`.bad` file holding the error, so every worker reaches the same verdict. The next shard is
decoded ahead in a background thread, so workers moving in step rarely wait.

Files go to /dev/shm when it has room (else the temp dir) in a directory owned by one loader
iteration; shards every worker has moved past are deleted, and the directory at the end.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

FIELDS = ("offsets", "genes", "bins", "joinids", "labels")
WAIT_TIMEOUT_S = 600.0  # a worker decoding one shard never takes this long; a dead one might


PREFIX = "celljepa-loader-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _pid_namespace() -> str:
    """Pids only mean something inside one pid namespace (containers may share /dev/shm)."""
    try:
        return os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        return "0"


def remove_stale_dirs(base: Path) -> None:
    """Delete cache dirs left by killed jobs of this pid namespace (SIGKILL skips every cleanup)."""
    for path in base.glob(f"{PREFIX}{_pid_namespace()}-*"):
        try:
            pid = int(path.name.split("-")[3])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def make_cache_dir(min_free_bytes: int = 2 << 30) -> Path:
    base = Path("/dev/shm")
    if not (base.is_dir() and os.access(base, os.W_OK) and shutil.disk_usage(base).free >= min_free_bytes):
        base = Path(tempfile.gettempdir())
    remove_stale_dirs(base)
    path = base / f"{PREFIX}{_pid_namespace()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    return path


class ReadAhead:
    """Loads shards in background threads (file reading, sha256 and numpy copies release the GIL,
    so this overlaps with building batches). start(i) begins loading shard i unless already begun;
    get(i) returns it, loading it here when it was not started, and raises what the load raised,
    as a direct load would; discard(i) waits for shard i and drops it."""

    def __init__(self, load: Callable[[int], object]):
        self.load = load
        self._jobs: dict[int, tuple[threading.Thread, list]] = {}

    def __contains__(self, index: int) -> bool:
        return index in self._jobs

    def start(self, index: int) -> None:
        if index in self._jobs:
            return
        box: list = []

        def work():
            try:
                box.append((True, self.load(index)))
            except BaseException as e:  # handed to get()
                box.append((False, e))

        thread = threading.Thread(target=work, name=f"shard-read-ahead-{index}", daemon=True)
        self._jobs[index] = (thread, box)
        thread.start()

    def get(self, index: int):
        job = self._jobs.pop(index, None)
        if job is None:
            return self.load(index)
        job[0].join()
        ok, value = job[1][0]
        if not ok:
            raise value.with_traceback(None)
        return value

    def discard(self, index: int) -> None:
        job = self._jobs.pop(index, None)
        if job is not None:
            job[0].join()

    def join(self) -> None:
        for thread, _ in self._jobs.values():
            thread.join()
        self._jobs.clear()


class SharedShardCache:
    """get(index) -> decoded shard, decoding it here or waiting for the worker that does."""

    def __init__(self, root: Path, load: Callable[[int], object], make: Callable[..., object], error: type):
        self.root, self.load, self.make, self.error = Path(root), load, make, error
        self._ahead = ReadAhead(self._prefetched)

    def _path(self, index: int, suffix: str) -> Path:
        return self.root / f"{index:06d}.{suffix}"

    def _try_lock(self, index: int) -> bool:
        try:
            os.close(os.open(self._path(index, "lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def _publish(self, index: int, cells) -> None:
        for name in FIELDS:
            tmp = self._path(index, f"{name}.tmp.npy")
            np.save(tmp, getattr(cells, name))
            os.replace(tmp, self._path(index, f"{name}.npy"))
        self._path(index, "ready").touch()

    def _decode_and_publish(self, index: int):
        """Runs with the lock held; publishes the shard or its error."""
        try:
            cells = self.load(index)
        except self.error as e:
            tmp = self._path(index, "bad.tmp")
            tmp.write_text(str(e))
            os.replace(tmp, self._path(index, "bad"))
            raise
        except BaseException:
            self._path(index, "lock").unlink(missing_ok=True)  # let another worker retry
            raise
        self._publish(index, cells)
        return cells

    def _open(self, index: int):
        return self.make(**{name: np.load(self._path(index, f"{name}.npy"), mmap_mode="r") for name in FIELDS})

    def get(self, index: int):
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while True:
            if self._path(index, "ready").exists():
                try:
                    return self._open(index)
                except FileNotFoundError:  # released under our feet: decode it again
                    pass
            bad = self._path(index, "bad")
            if bad.exists():
                raise self.error(bad.read_text())
            if self._try_lock(index):
                return self._decode_and_publish(index)
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {WAIT_TIMEOUT_S:.0f}s for another loader worker to decode shard #{index}")
            time.sleep(0.002)

    def _prefetched(self, index: int) -> None:
        try:
            self._decode_and_publish(index)
        except BaseException:
            pass  # the .bad file (or a freed lock) tells whoever needs the shard

    def prefetch(self, index: int) -> None:
        """Decode `index` in a background thread unless some worker already has it or is on it."""
        if index in self._ahead or self._path(index, "ready").exists() or not self._try_lock(index):
            return
        self._ahead.start(index)

    def release(self, index: int) -> None:
        """Delete a shard's files (mapped copies stay valid until unmapped)."""
        self._ahead.discard(index)
        for path in self.root.glob(f"{index:06d}.*"):
            path.unlink(missing_ok=True)

    def join(self) -> None:
        self._ahead.join()
