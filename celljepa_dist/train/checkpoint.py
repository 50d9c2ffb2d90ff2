"""Checkpoints with commit markers, per-rank state files, keep-last-K and strict resume.

Layout of one checkpoint, `run_dir/checkpoints/step_{N:08d}/`:
    engine/            DeepSpeed `save_checkpoint` output (model, optimiser, LR schedule)
    teacher/           teacher.pt (ZeRO 0-2, rank 0) or shard_rank{r}.pt (ZeRO-3, every rank)
    train_state.json   step, epoch, batches done in the epoch, EMA step, world size (rank 0)
    rank_{r}.pt        per-rank RNG states and loader state (DeepSpeed's client_state is rank-0 only)
    CHECKSUMS.json     size and sha256 of every file above (checksums.py), rank 0, before the marker
    COMMITTED          written by rank 0 after a barrier that follows every rank's save

A directory without COMMITTED is a save that did not finish: resume ignores it and rank 0
removes it. Resume never falls back to a fresh start when the user asked for one. A committed
checkpoint whose files do not match their checksums is skipped by `--resume auto` (loudly, in
favour of the newest intact one) and refused when named explicitly.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from celljepa_dist.atomic import atomic_path, atomic_write_text
from celljepa_dist.train.checksums import merge_shares, record_share, verify_share

COMMIT_MARKER = "COMMITTED"
# Test hook: rank 0 SIGKILLs itself in the one window where a save is complete on disk but not
# committed. Tests use it to prove a half-finished save is never resumed from.
KILL_BEFORE_COMMIT_ENV = "CELLJEPA_KILL_BEFORE_COMMIT"
ENGINE_TAG = "engine"


class ResumeError(RuntimeError):
    pass


class CheckpointSaveError(RuntimeError):
    """A save failed; the message leads with the checkpoint path, the cause and the free space."""


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


def _all_problems(problems: list[str] | None, world_size: int) -> list[str] | None:
    """Every rank's verification problems, in rank order, on every rank (collective); None when
    the checkpoint has no checksums (the same on every rank: one shared manifest)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return problems
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, problems)
    if any(p is None for p in gathered):
        return None
    return [line for share in gathered for line in share]


def resolve_verified_resume(root: Path, spec: str, rank: int = 0, world_size: int = 1) -> Path | None:
    """`resolve_resume`, checked against the checkpoints' recorded checksums (collective: every
    rank calls it and verifies its share of the files). 'auto' resumes from the newest committed
    checkpoint that is intact, with a loud warning naming each corrupt file of the newer ones it
    skips (left in place: a later save of that step replaces them); a named checkpoint that is
    not intact is an error naming the file."""
    chosen = resolve_resume(root, spec)
    if chosen is None:
        return None
    candidates = committed_checkpoints(root)[::-1] if spec == "auto" else [chosen]
    rejected = []
    for d in candidates:
        problems = _all_problems(verify_share(d, rank, world_size), world_size)
        if problems is None:
            if rank == 0:
                print(f"note: {d} has no checksums (written before they were recorded): resumed unverified",
                      flush=True)
            return d
        if not problems:
            return d
        report = f"checkpoint {d.name}: {'; '.join(problems)}"
        if spec != "auto":
            raise ResumeError(f"--resume {spec}: {report}. The checkpoint is corrupt; resume from another one "
                              f"(--resume auto takes the newest intact one)")
        rejected.append(report)
        if rank == 0:
            print(f"WARNING: {'!' * 70}\nWARNING: {report}\nWARNING: {d} is corrupt: skipped, "
                  f"trying the next older committed checkpoint. It stays on disk for inspection; the run "
                  f"replaces it when it saves that step again.\nWARNING: {'!' * 70}", flush=True)
    raise ResumeError(f"--resume auto: no intact committed checkpoint under {root} (refusing a silent fresh "
                      f"start): {' | '.join(rejected)}")


def free_space_mib(path: Path) -> int:
    """Free space of the filesystem holding `path` (or its nearest existing parent), in MiB."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free // 2**20


def _error_chain(err: BaseException) -> str:
    """`err` with the errors it was raised while handling, first one first: torch's first write
    error ("iostream error") is the cause, its "unexpected pos" on closing the file a consequence."""
    chain = [err]
    while chain[-1].__context__ is not None and len(chain) < 5:
        chain.append(chain[-1].__context__)
    return ", then ".join(f"{type(e).__name__}: {e}" for e in reversed(chain))


def save_failure(d: Path, err: BaseException) -> CheckpointSaveError:
    """The root cause of a failed save first: torch reports a full disk as an "iostream error" and
    MLflow's next write as "database or disk is full"; this names the path and the free space
    (and a per-process file size limit, when one is set: it fails writes on a disk with room)."""
    try:
        free = f"{free_space_mib(d)} MiB"
    except OSError as stat_err:
        free = f"unknown ({stat_err})"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        free += f" (this process may not write files past {limit} bytes: ulimit -f)"
    return CheckpointSaveError(f"checkpoint save to {d} failed: {_error_chain(err)}; "
                               f"free space on that filesystem: {free}")


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
        """Collective: every rank calls it. Returns the committed directory. A failed write (full
        disk, quota, I/O error) raises CheckpointSaveError naming the path and the free space."""
        d = self.root / step_dir_name(step)
        try:
            self._save(d, step, engine, teacher, train_state, rank_state)
        except (OSError, RuntimeError) as err:
            raise save_failure(d, err) from err
        return d

    def _save(self, d: Path, step: int, engine, teacher, train_state: dict, rank_state: dict) -> None:
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
        _barrier()  # every rank's files are on disk before they are hashed
        record_share(d, self.rank, self.world_size)
        _barrier()  # ...and every rank's checksums before the manifest and the marker
        if self.rank == 0 and os.environ.get(KILL_BEFORE_COMMIT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # fault-injection point for the crash-during-save test
        if self.rank == 0:
            merge_shares(d, self.world_size)
            atomic_write_text(d / COMMIT_MARKER, json.dumps({"step": step, "world_size": self.world_size}))
            self._prune(keep=d)
        _barrier()

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
        # Checkpoints with checksums were verified before (resolve_verified_resume); these catch
        # what older ones can hold, naming the part, where torch would name no file.
        try:
            load_path, _ = engine.load_checkpoint(str(d / "engine"), tag=ENGINE_TAG, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise ResumeError(f"{d / 'engine'}: DeepSpeed could not load the engine state: {err}") from err
        if load_path is None:
            raise ResumeError(f"{d}: DeepSpeed could not load the engine state from {d / 'engine'}")
        if teacher is not None:
            try:
                teacher.load(d / "teacher")
            except (OSError, RuntimeError, EOFError) as err:
                raise ResumeError(f"{d / 'teacher'}: the EMA teacher could not be loaded: {err}") from err
        rank_file = d / f"rank_{self.rank}.pt"
        if not rank_file.exists():
            raise ResumeError(f"{d}: per-rank state {rank_file.name} missing")
        try:
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        except Exception as err:  # unpickling garbage raises anything (ValueError, UnpicklingError, ...)
            raise ResumeError(f"{rank_file}: unreadable per-rank state ({type(err).__name__}: {err})") from err
        set_rng_state(rank_state["rng"])
        return train_state, rank_state
