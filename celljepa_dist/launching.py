"""Starting multi-rank jobs from Python (demo, benchmarks, tests).

The launcher is run as `python -m deepspeed.launcher.runner` with this interpreter rather than the
`deepspeed` console script: the script is only on PATH when the venv is activated (CI and
`make` call `.venv/bin/python` directly), and the module path cannot pick up another
environment's DeepSpeed.
"""
from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port free right now on localhost (other jobs may share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher(*args: str) -> list[str]:
    """argv for the DeepSpeed launcher of this interpreter, followed by `args`."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", *map(str, args)]
