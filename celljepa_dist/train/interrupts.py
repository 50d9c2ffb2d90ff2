"""SIGINT and SIGTERM stop a rank at once, as exceptions, so the run records how it ended.

Python turns SIGINT into KeyboardInterrupt, but SIGTERM (what launchers, SLURM and `kill` send,
and what `train/launcher_watch.py` sends an orphaned rank) kills the process outright by default:
the MLflow run would stay RUNNING forever. Here SIGTERM raises `Terminated` at the point the rank
is at, like Ctrl-C. Neither exception is caught by the training code: the step in flight is
abandoned and no checkpoint is written. A checkpoint is valid only with its COMMITTED marker,
written by rank 0 after every rank's files are complete (train/checkpoint.py), so a save cut
short leaves at most an uncommitted directory, removed at the next start.

Only the first signal raises, and none inside `shielded()`. Launchers send more than one (Ctrl-C
reaches every process of the terminal, then DeepSpeed's launch.py sends SIGTERM to each rank), and
a rank that is already failing (a peer vanished) may be signalled too: an exception then would
cut the cleanup short (marking the MLflow run KILLED or FAILED). Cleanup is bounded instead: a
rank still alive `EXIT_GRACE_S` after the first signal exits at once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

EXIT_GRACE_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_stopping: dict[str, int] = {}  # the first signal received, once there is one
_shield_depth = 0  # > 0 inside `shielded()`


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt (a BaseException: `except Exception` lets it pass)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"stopped by {signal.Signals(signum).name}: the step in flight was abandoned, no "
                         "checkpoint was written; the newest committed checkpoint is where --resume auto continues")
        self.signum = signum


def end_status(exc: BaseException) -> str:
    """MLflow's status for a run that ended with `exc`: KILLED when someone stopped it (Ctrl-C,
    SIGTERM), FAILED for anything that went wrong."""
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, Terminated)) else "FAILED"


def exit_after(seconds: float, code: int) -> None:
    """Hard exit (no cleanup) of this process in `seconds`, from a daemon thread."""
    timer = threading.Timer(seconds, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


def _on_signal(signum, frame) -> None:
    if _stopping or _shield_depth:
        print(f"rank pid {os.getpid()}: {signal.Signals(signum).name} while already stopping; cleanup continues "
              f"(at most {EXIT_GRACE_S:g} s)", file=sys.stderr, flush=True)
        if not _stopping:
            _stopping["signum"] = signum
            exit_after(EXIT_GRACE_S, 128 + signum)
        return
    _stopping["signum"] = signum
    exit_after(EXIT_GRACE_S, 128 + signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def install() -> bool:
    """SIGINT -> KeyboardInterrupt, SIGTERM -> Terminated, once; later signals only bounded by the
    grace period. Only the main thread can install handlers: elsewhere nothing changes (False)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    return True


@contextmanager
def shielded():
    """A block that a signal must not cut short (the cleanup of a run that is already failing, e.g.
    marking its MLflow run): a signal inside it raises nothing, only starts the grace period."""
    global _shield_depth
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1
