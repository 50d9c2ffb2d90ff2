"""What the reference tests share (scib, GEARS): each builds the reference package in a venv of its
own; a build step that cannot run here (no package index, a timeout) skips the test with the
step's last output rather than failing it."""
from __future__ import annotations

import subprocess

import pytest


def run_or_skip(cmd: list[str], what: str, env_name: str, timeout: int) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{env_name} reference env: {what} timed out after {timeout} s")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        pytest.skip(f"{env_name} reference env could not be built ({what} failed, exit {proc.returncode}); no "
                    f"package index reachable? Last output:\n{tail}")
