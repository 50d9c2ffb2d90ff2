"""A rank whose launcher is gone stops at once.

`kill -9` of the `deepspeed` launcher leaves its ranks running: nobody would ever read their
output, their exit status, or stop them, yet they keep training, committing and holding the run
directory. DeepSpeed starts ranks through two processes per node, `deepspeed.launcher.runner`
(what the user started) above `deepspeed.launcher.launch` (the ranks' parent); torchrun has one.
The launcher of a rank is this chain of launcher processes above it; the rank stops when any link
breaks:

* the parent dies: the kernel sends SIGTERM at once (`prctl(PR_SET_PDEATHSIG)`);
* any process of the chain dies (the runner above launch.py, which PDEATHSIG cannot see), or the
  parent died before PDEATHSIG was set: a thread checks every `POLL_S` that each process of the
  chain still has the parent it had at start (a dead process's children are re-parented, so this
  cannot be fooled by a reused pid), and then sends the rank SIGTERM itself.

SIGTERM ends the rank without a checkpoint (`train/interrupts.py`); if it is still alive
`interrupts.EXIT_GRACE_S` later (stuck in a collective with a peer that is not dying), the thread
exits it. A rank started without a launcher (`python launch/pretrain.py`, SLURM's srun, whose
slurmstepd stops its tasks itself) is not watched: `nohup python ...` must survive its shell.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

from celljepa_dist.train.interrupts import EXIT_GRACE_S, exit_after

POLL_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Command-line fragments of launcher processes (python -m ..., or the console scripts).
LAUNCHER_MARKERS = ("deepspeed.launcher.", "deepspeed/launcher/", "bin/deepspeed", "torchrun",
                    "torch.distributed.run", "torch.distributed.launch")


def command_of(pid: int) -> str:
    """The command line of a live process ('' if it is gone or unreadable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def parent_of(pid: int) -> int | None:
    """The parent pid of a live process (None if it is gone). /proc/PID/stat: `pid (comm) state ppid ...`,
    where comm may itself contain spaces and parentheses."""
    if pid == os.getpid():
        return os.getppid()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def is_launcher(command: str) -> bool:
    return any(marker in command for marker in LAUNCHER_MARKERS)


def launcher_links(pid: int | None = None) -> list[tuple[int, int]]:
    """(child, parent) links from `pid` (this process) up through its launcher processes: empty when
    the parent is no launcher. Each link must hold for as long as the rank runs."""
    child = os.getpid() if pid is None else pid
    links = []
    while True:
        parent = parent_of(child)
        if parent is None or parent <= 1 or not is_launcher(command_of(parent)):
            return links
        links.append((child, parent))
        child = parent


def broken_link(links: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The first (child, parent) link whose parent is gone (child re-parented or gone), else None."""
    for child, parent in links:
        if parent_of(child) != parent:
            return child, parent
    return None


def set_parent_death_signal(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, signum): the kernel signals this process when its parent dies.
    Linux only; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stop_orphan(child: int, parent: int) -> None:
    print(f"rank pid {os.getpid()}: launcher process {parent} is gone (its child {child} was re-parented): "
          "stopping now, without a checkpoint", file=sys.stderr, flush=True)
    exit_after(EXIT_GRACE_S, 128 + signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)


def _watch(links: list[tuple[int, int]]) -> None:
    while True:
        broken = broken_link(links)
        if broken is not None:
            _stop_orphan(*broken)
            return
        time.sleep(POLL_S)


def watch_launcher() -> list[tuple[int, int]]:
    """Call once at rank start, before anything waits for peers. Returns the links watched."""
    links = launcher_links()
    if not links:
        return links
    set_parent_death_signal(signal.SIGTERM)
    # PDEATHSIG is not sent for a parent that died before the prctl: the thread's first check sees it.
    threading.Thread(target=_watch, args=(links,), name="launcher-watch", daemon=True).start()
    return links
