"""What the tests that launch real training runs share: the CPU environment and the argv of
`launch/pretrain.py` or `launch/finetune.py` (1 rank in this interpreter, or several through
DeepSpeed's launcher)."""
from __future__ import annotations

import os
import sys
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
