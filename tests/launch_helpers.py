"""What the tests that launch real training runs share: the CPU environment and the argv of
`launch/pretrain.py` or `launch/finetune.py` (1 rank in this interpreter, or several through
DeepSpeed's launcher)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from celljepa_dist.launching import deepspeed_launcher, free_port

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"
FINETUNE = REPO / "launch" / "finetune.py"


def cpu_env(extra: dict | None = None) -> dict:
    """DeepSpeed on CPU ranks (gloo), one thread per rank: 2 ranks share the 2 cores."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(extra or {})}


def pretrain_argv(config: Path, sets: list[str], ranks: int = 1, launcher: bool = False,
                  script: Path = PRETRAIN) -> list[str]:
    """`launch/pretrain.py --config C --set ...`: plain python for 1 rank, else (or with
    `launcher`) through the deepspeed launcher."""
    head = deepspeed_launcher("--num_gpus", ranks, "--master_port", free_port(), script) \
        if ranks > 1 or launcher else [sys.executable, str(script)]
    argv = [*map(str, head), "--config", str(config)]
    for s in sets:
        argv += ["--set", s]
    return argv


def finetune_argv(config: Path, sets: list[str], ranks: int = 1, launcher: bool = False) -> list[str]:
    """`launch/finetune.py --config C --set ...`, launched as pretrain_argv launches pre-training."""
    return pretrain_argv(config, sets, ranks, launcher, script=FINETUNE)


def torchrun_argv(script: Path, config: Path, sets: list[str], ranks: int = 2) -> list[str]:
    """`torchrun --nproc_per_node R SCRIPT --config C --set ...` (as `python -m torch.distributed.run`:
    the venv's interpreter, whatever PATH holds)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(free_port()), str(script), "--config", str(config)]
    for s in sets:
        argv += ["--set", s]
    return argv


def kill_job_at_step(argv: list[str], run_dir: Path, step: int, timeout_s: float = 300) -> int:
    """Start a training job in its own process group, SIGKILL the whole group (launcher and every
    rank) once RUN_DIR/progress.json reports `step` done, and return the step it reached: a
    kill -9 of a whole job, as a node failure or an OOM killer gives."""
    proc = subprocess.Popen(argv, cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, progress = time.time() + timeout_s, run_dir / "progress.json"
    try:
        while time.time() < deadline:
            if progress.exists() and json.loads(progress.read_text())["step"] >= step:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        else:
            raise AssertionError(f"the run did not reach step {step} within {timeout_s} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return json.loads(progress.read_text())["step"]


def assert_bit_identical(ref: dict, got: dict, what: str) -> None:
    """Two state dicts with the same keys and every tensor equal to the bit (a resumed run's weights
    against an uninterrupted run's)."""
    import torch

    assert ref.keys() == got.keys(), f"{what}: different parameters"
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{what} {k} differs after resume"
