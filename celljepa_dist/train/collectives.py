"""Collective timeouts: how long ranks wait for each other, and the error when one stops answering.

torch waits 30 minutes by default, so one stalled rank (SIGSTOP, a hung filesystem, a swapping
node) froze the whole job that long without a word. The process group is created with
`distributed.commit_timeout_s` for setup (train/engine.py), which legitimately takes long on some
ranks (checkpoint loading, rank 0's MLflow run), then every rank switches to
`distributed.timeout_s` for training (`enter_training`); checkpoint commits run under the long one
again (`collective_timeout`). On gloo a collective that waits
past its timeout raises a RuntimeError ("Timed out waiting ... for recv"); `explain_failure`
turns it into `CollectiveTimeout` naming the step, the silent rank (heartbeat.py) and the last
committed checkpoint. NCCL's watchdog aborts the process on a timeout instead of raising: there,
the heartbeat files name the silent rank (docs/training.md, "Faults").
"""
from __future__ import annotations

import datetime
import re
import time
from contextlib import contextmanager
from pathlib import Path

from celljepa_dist.train.heartbeat import read_heartbeats, silent_rank

# gloo: "Timed out waiting 10000ms for recv operation to complete"; the store: "Socket Timeout".
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
# A peer process that died: its sockets are closed by the kernel.
_PEER_GONE = re.compile(r"connection (closed|reset) by peer|broken pipe", re.IGNORECASE)

# The commit (or other) window a collective failed in, kept after the window's exit so the error
# raised further up still says where it happened; None on the way out of a window that succeeded.
_failed_window: tuple[str, float] | None = None
STALE_BEATS = 3


class CollectiveTimeout(RuntimeError):
    pass


def as_timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _all_groups() -> list:
    """The default process group and every group made from it (DeepSpeed's ZeRO groups too)."""
    import torch.distributed.distributed_c10d as c10d

    return [None, *[pg for pg in list(c10d._world.pg_map) if pg is not c10d._get_default_group()]]


def set_timeout(seconds: float) -> None:
    """Timeout of every later collective of this rank, in every process group."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if dist.is_available() and dist.is_initialized():
        for group in _all_groups():
            try:
                _set_pg_timeout(as_timedelta(seconds), group)
            except ValueError:  # a group this rank is not part of
                pass


def enter_training(timeout_s: float) -> None:
    """Collective, once every rank has set up: from here a rank that stays silent for `timeout_s` is
    reported. Setup ran under the long (commit) timeout: rank 0 alone creates the MLflow run and
    writes the run files, and a resume loads checkpoints, while the others already wait. The barrier
    (still under that timeout) lines the ranks up, so no rank starts its first step's clock early."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    set_timeout(timeout_s)


@contextmanager
def collective_timeout(seconds: float, restore_s: float, what: str):
    """Collectives inside the block wait up to `seconds`, then `restore_s` again. `what` names the
    block in the error if one of its collectives fails (e.g. "commit of step 10")."""
    global _failed_window
    _failed_window = None
    set_timeout(seconds)
    try:
        yield
    except BaseException:
        _failed_window = (what, seconds)
        raise
    finally:
        set_timeout(restore_s)


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and bool(_TIMEOUT.search(str(exc)))


def is_peer_gone(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and bool(_PEER_GONE.search(str(exc)))


def describe_failure(exc: BaseException, *, where: str, timeout_s: float, rank: int, beats: dict[int, dict | None],
                     heartbeat_s: float, now: float, last_commit: Path | None) -> str | None:
    """The message for a collective that failed on `rank` (None: `exc` is no collective failure).
    A pure function of what the survivor knows: where it was, the timeout, every rank's heartbeat.
    A heartbeat older than STALE_BEATS beats means its rank is stopped, hung or dead."""
    if not (is_timeout(exc) or is_peer_gone(exc)):
        return None
    suspect = silent_rank(beats, rank)
    who, heard, alive = "a peer", "", False
    if suspect is not None:
        r, b = suspect
        who = f"rank {r}"
        if b is None:
            heard = f"; rank {r} never wrote a heartbeat"
        else:
            age = now - b["time"]
            alive = age < STALE_BEATS * heartbeat_s
            heard = f"; rank {r} (pid {b['pid']} on {b['host']}) last beat {age:.0f} s ago at step {b['step']}"
    if is_peer_gone(exc):
        head = f"{where}: {who} is gone (its connection closed: the process died)"
    elif alive:
        head = (f"{where}: no answer within {timeout_s:g} s (collective timeout), yet every rank's heartbeat is "
                f"recent: {who} is alive but did not join (busy elsewhere: slow I/O, or a collective the others "
                "are not in)")
    else:
        head = f"{where}: {who} sent nothing for {timeout_s:g} s (collective timeout)"
    return f"{head}{heard}; last committed checkpoint: {last_commit or 'none'} (--resume auto continues there)"


def explain_failure(exc: BaseException, *, step: int, timeout_s: float, heartbeat_s: float, run_dir: Path, rank: int,
                    world_size: int, last_commit: Path | None) -> None:
    """Raise CollectiveTimeout (from `exc`) naming the step and the silent rank if `exc` is a
    collective that timed out or lost a peer; return otherwise. `step`: the step in flight."""
    where, seconds = _failed_window if _failed_window is not None else (f"step {step}", timeout_s)
    message = describe_failure(exc, where=where, timeout_s=seconds, rank=rank,
                               beats=read_heartbeats(run_dir, world_size), heartbeat_s=heartbeat_s, now=time.time(),
                               last_commit=last_commit)
    if message is not None:
        raise CollectiveTimeout(message) from exc
