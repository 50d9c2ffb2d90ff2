"""Atomic file writes (a temp file in the same directory, then os.replace) and JSON reads whose
errors name the file.

Readers (another rank, a resumed job, a user's shell) never see half a file: a crash leaves either
the old file or the new one, plus at worst a hidden `.NAME.*.tmp` that nothing reads.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path_beside(path: str | os.PathLike) -> Path:
    """A new empty temp file `.NAME.*.tmp` in path's directory (created if missing): the name
    every atomic write uses, so a resumed job can find and remove its stale ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give the finished temp file its final name in one step."""
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are shared between users and jobs
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on normal exit it replaces `path`, on error it is removed.

    The writer inside the block is responsible for flushing/fsyncing if it needs durability.
    """
    tmp = temp_path_beside(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:  # durable before the rename; skipped for per-step heartbeats
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG under its final name only once complete; closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def read_json(path: str | os.PathLike, what: str):
    """Parse a JSON file; a missing or broken file raises an error naming `what` and the path."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
