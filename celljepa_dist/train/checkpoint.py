"""Checkpoints with commit markers, per-rank state files, keep-last-K and strict resume.

Layout of one checkpoint, `run_dir/checkpoints/step_{N:08d}/`:
    engine/            DeepSpeed `save_checkpoint` output (model, optimiser, LR schedule)
    teacher/           teacher.pt (ZeRO 0-2, rank 0) or shard_rank{r}.pt (ZeRO-3, every rank)
    train_state.json   step, epoch, batches done in the epoch, EMA step, world size (rank 0)
    rank_{r}.pt        per-rank RNG states and loader state (DeepSpeed's client_state is rank-0 only)
    COMMITTED          written by rank 0 after a barrier that follows every rank's save

A directory without COMMITTED is a save that did not finish: resume ignores it and rank 0
removes it. Resume never falls back to a fresh start when the user asked for one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from celljepa_dist.atomic import atomic_path, atomic_write_text

COMMIT_MARKER = "COMMITTED"
# Test hook: rank 0 SIGKILLs itself in the one window where a save is complete on disk but not
# committed. Tests use it to prove a half-finished save is never resumed from.
KILL_BEFORE_COMMIT_ENV = "CELLJEPA_KILL_BEFORE_COMMIT"
ENGINE_TAG = "engine"


class ResumeError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def committed_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint dirs, oldest first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_") and (d / COMMIT_MARKER).exists()]
    return sorted(dirs, key=lambda d: int(d.name.split("_")[1]))


def resolve_resume(root: Path, spec: str) -> Path | None:
    """'none' -> None; 'auto' -> newest committed (error if none); a path -> must be committed."""
    if spec in ("", "none"):
        return None
    if spec == "auto":
        found = committed_checkpoints(root)
        if not found:
            raise ResumeError(f"--resume auto: no committed checkpoint under {root} (refusing a silent fresh start)")
        return found[-1]
    path = Path(spec)
    if not (path / COMMIT_MARKER).exists():
        raise ResumeError(f"--resume {spec}: not a committed checkpoint (no {COMMIT_MARKER} in {path})")
    return path


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    def clean_uncommitted(self) -> None:
        """Rank 0 removes leftovers of interrupted saves (call on every rank: it barriers)."""
        if self.rank == 0 and self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and d.name.startswith("step_") and not (d / COMMIT_MARKER).exists():
                    shutil.rmtree(d, ignore_errors=True)
        _barrier()

    def save(self, step: int, engine, teacher, train_state: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it. Returns the committed directory."""
        d = self.root / step_dir_name(step)
        if self.rank == 0:
            if d.exists():  # a re-run over an older resume point: uncommit first, then replace
                (d / COMMIT_MARKER).unlink(missing_ok=True)
                shutil.rmtree(d)
            d.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(d / "engine"), tag=ENGINE_TAG, save_latest=False)
        if teacher is not None:
            teacher.save(d / "teacher")
        with atomic_path(d / f"rank_{self.rank}.pt") as tmp:
            torch.save({"rng": rng_state(), **rank_state}, tmp)
        if self.rank == 0:
            state = {**train_state, "world_size": self.world_size, "has_teacher": teacher is not None}
            atomic_write_text(d / "train_state.json", json.dumps(state, indent=2))
        _barrier()  # every rank's files are on disk before the marker
        if self.rank == 0 and os.environ.get(KILL_BEFORE_COMMIT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # fault-injection point for the crash-during-save test
        if self.rank == 0:
            atomic_write_text(d / COMMIT_MARKER, json.dumps({"step": step, "world_size": self.world_size}))
            self._prune(keep=d)
        _barrier()
        return d

    def _prune(self, keep: Path) -> None:
        committed = committed_checkpoints(self.root)
        for old in committed[: max(0, len(committed) - self.keep_last)]:
            if old != keep:
                (old / COMMIT_MARKER).unlink(missing_ok=True)  # uncommitted before it disappears
                shutil.rmtree(old, ignore_errors=True)

    def load(self, d: Path, engine, teacher) -> tuple[dict, dict]:
        """Restore engine, teacher and this rank's RNG; returns (train_state, rank_state)."""
        train_state = json.loads((d / "train_state.json").read_text())
        if train_state["world_size"] != self.world_size:
            raise ResumeError(
                f"{d}: saved with world size {train_state['world_size']}, now {self.world_size}; "
                "convert it with DeepSpeed's ds_to_universal.py to change the world size"
            )
        if train_state["has_teacher"] != (teacher is not None):
            raise ResumeError(f"{d}: teacher presence differs from this run's objective")
        load_path, _ = engine.load_checkpoint(str(d / "engine"), tag=ENGINE_TAG, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise ResumeError(f"{d}: DeepSpeed could not load the engine state from {d / 'engine'}")
        if teacher is not None:
            teacher.load(d / "teacher")
        rank_file = d / f"rank_{self.rank}.pt"
        if not rank_file.exists():
            raise ResumeError(f"{d}: per-rank state {rank_file.name} missing")
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(rank_state["rng"])
        return train_state, rank_state
