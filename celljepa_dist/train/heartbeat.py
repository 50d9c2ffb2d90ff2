"""Per-rank heartbeats: `RUN_DIR/.heartbeat/rank_R`, so a rank that gave up waiting can say which
peer went silent.

When a collective times out, the survivors know only that somebody did not answer. Each rank
keeps rewriting a small JSON file (`{"rank", "step", "time", "pid", "host"}`) from a daemon thread
every `distributed.heartbeat_s`; the training loop only sets the step it reached (`beat`, an
attribute store, nothing written per step). The thread keeps beating while its rank waits inside a
collective (torch releases the GIL there), and stops when the rank is stopped (SIGSTOP), hung
while holding the GIL, or dead: the silent rank is the one whose heartbeat is oldest.

Writes are atomic (no reader sees half a file) and not fsynced: a heartbeat lost in a crash
costs nothing, and an fsync per beat on a shared filesystem would. Run-directory files: written
only after the run lock is held (train/run_lock.py).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from celljepa_dist.atomic import atomic_write_text

HEARTBEAT_DIR = ".heartbeat"


def heartbeat_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank_{rank}"


class Heartbeat:
    """This rank's heartbeat file, rewritten every `every_s` seconds with the last step reached."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, every_s: float):
        self.path, self.rank, self.every_s = heartbeat_path(run_dir, rank), rank, every_s
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{rank}", daemon=True)

    def record(self) -> dict:
        return {"rank": self.rank, "step": self.step, "time": time.time(), "pid": os.getpid(),
                "host": socket.gethostname()}

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.record()), fsync=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.write()
            except OSError:  # a full or flaky filesystem must not kill training; the next beat retries
                pass
            self._stop.wait(self.every_s)

    def start(self) -> "Heartbeat":
        self.write()  # the first beat before the first collective that could time out
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


_current: Heartbeat | None = None


def start_heartbeat(run_dir: str | os.PathLike, rank: int, every_s: float) -> Heartbeat:
    """This process's heartbeat (one per rank; a second call replaces the first)."""
    global _current
    if _current is not None:
        _current.stop()
    _current = Heartbeat(run_dir, rank, every_s).start()
    return _current


def beat(step: int) -> None:
    """The training loop reached `step` (cheap: the thread writes it at its next beat)."""
    if _current is not None:
        _current.step = step


def read_heartbeats(run_dir: str | os.PathLike, world_size: int) -> dict[int, dict | None]:
    """Every rank's last heartbeat (None: no file, or unreadable)."""
    out: dict[int, dict | None] = {}
    for rank in range(world_size):
        try:
            out[rank] = json.loads(heartbeat_path(run_dir, rank).read_text())
        except (OSError, ValueError):
            out[rank] = None
    return out


def silent_rank(beats: dict[int, dict | None], me: int) -> tuple[int, dict | None] | None:
    """The peer of `me` heard from longest ago: one without any heartbeat first, then the oldest.
    None when `me` has no peer."""
    peers = [(r, b) for r, b in beats.items() if r != me]
    if not peers:
        return None
    return min(peers, key=lambda rb: (rb[1] is not None, rb[1]["time"] if rb[1] else 0.0, rb[0]))
