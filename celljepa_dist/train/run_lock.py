"""One job per run directory: an exclusive lock on `RUN_DIR/.lock` for the job's lifetime.

Two jobs on one run directory (a second `--resume auto` started while the first still trains)
would both append to `losses.jsonl`, commit and prune the same checkpoints and log to the same
MLflow run. The second job therefore stops before it touches any of those, with an error naming
the holder.

The lock is `fcntl.flock` on `RUN_DIR/.lock`: the kernel releases it when the holding process
dies, however it dies (SIGKILL, OOM, node reboot), so a relaunch after a crash or a SLURM requeue
just takes it; there is no stale-lock cleanup to get wrong. The file itself is never removed:
unlinking a lock file while another process waits on it would let two processes hold locks on
two different files of the same name.

Who holds it: rank 0 only, for the whole job. The lock is per job, not per process: two ranks of
one job must not block each other (flock conflicts between any two open files, in one process or
not), and a per-node lock would let a second job placed on other nodes through. One lock taken by
one rank on the shared run directory covers every placement; the other ranks learn the outcome
through a broadcast, so every rank of a refused job stops (none waits for a peer that left).
When rank 0 dies, the lock goes with it while the other ranks may live on a little: they fail at
their next collective (`distributed.timeout_s` at most) or with their launcher
(`train/launcher_watch.py`), and the next job removes uncommitted checkpoint leftovers at start.
Across nodes this needs a filesystem whose flock is cluster-wide (NFS, Lustre mounted with
`flock`; Lustre's `localflock` only locks within one node).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"
# A holder writes its identity right after it takes the lock; a job that finds the lock taken
# re-reads an empty file for this long before reporting an unknown holder.
IDENTITY_WAIT_S = 2.0

_held: dict[Path, int] = {}  # lock path -> fd, per process: the lock lives as long as the fd


class RunDirBusy(RuntimeError):
    pass


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK_FILE


def holder_identity() -> dict:
    """Who holds the lock, for the message another job prints: host, pid, the launcher's pid,
    start time, the command line (and the SLURM job, if any)."""
    ident = {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid(),
             "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": shlex.join(sys.argv)}
    if os.environ.get("SLURM_JOB_ID"):
        ident["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return ident


def describe_holder(run_dir: str | os.PathLike, ident: dict | None) -> str:
    """The refusal message (a pure function of the holder's identity)."""
    if not ident:
        return (f"error: {run_dir} is in use by another job (its lock {lock_path(run_dir)} is held; the "
                "holder did not record who it is); wait for it or stop it")
    slurm = f"SLURM job {ident['slurm_job_id']}, " if ident.get("slurm_job_id") else ""
    return (f"error: {run_dir} is in use by pid {ident['pid']} on host {ident['host']} since {ident['since']} "
            f"({slurm}launcher pid {ident.get('parent_pid', '?')}, command: {ident['command']}); "
            "wait for it or stop it")


def _read_identity(path: Path) -> dict | None:
    deadline = time.monotonic() + IDENTITY_WAIT_S
    while True:
        try:
            text = path.read_text()
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):  # gone, or caught mid-write: try again
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def try_lock(run_dir: str | os.PathLike) -> str | None:
    """Take the run directory's lock for this process (for good: it is released when the process
    exits). Returns None when held (already held by this process counts), else the refusal message.
    Creates the run directory, and nothing else in it but the lock file."""
    path = lock_path(run_dir).resolve()
    if path in _held:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return describe_holder(run_dir, _read_identity(path))
    # Rewritten in place, not through atomic.py: a renamed file would be another inode, and the
    # lock is on this one. Readers retry an empty or partial file (_read_identity).
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder_identity()) + "\n").encode(), 0)
    # A forked child (DataLoader worker) shares the open file and with it the lock: it would keep
    # the run directory locked after rank 0 died until it noticed. Children drop their copy.
    os.register_at_fork(after_in_child=lambda: os.close(fd))
    _held[path] = fd
    return None


def lock_run_dir(run_dir: str | os.PathLike, rank: int) -> None:
    """Collective (every rank calls it, right after the process group is up and before anything is
    written to the run directory): rank 0 takes the lock; if another job holds it, every rank
    raises RunDirBusy naming the holder."""
    refusal = try_lock(run_dir) if rank == 0 else None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise RunDirBusy(refusal if rank == 0 else f"{refusal} (rank {rank} stops with rank 0)")
