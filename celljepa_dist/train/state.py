"""The training state that survives a restart, and the check that a resume continues the same run.

`TrainState` is the global counters (rank 0 writes them to `train_state.json`); each rank's RNG
and loader position travel in its own `rank_R.pt` (checkpoint.py). Everything a restart restores
is listed in `docs/ARCHITECTURE.md` ("State that survives a restart").

The fingerprint is what makes two runs "the same run": the model, the data as the model sees it,
the objective and the schedule. Performance knobs (workers, ZeRO stage, precision, logging,
checkpoint cadence, paths) may change on resume; anything in the fingerprint may not, unless the
user says so (`checkpoint.allow_config_change`), because the EMA schedule, the LR schedule and the
data order all depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Config sections and keys that define the run (dotted names as in `config.flatten`); each task
# adds the keys of its own data section that change what the model sees (`Prepared.fingerprint_keys`).
FINGERPRINT_SECTIONS = ("model.", "loss.", "ema.", "optim.")
FINGERPRINT_KEYS = ("objective", "epochs", "max_steps", "seed", "deepspeed.gradient_accumulation_steps")
# Inside those sections, how the same function is computed (not what): free to change.
NOT_FINGERPRINTED = ("model.attention_backend", "model.flash_kernel")


def config_fingerprint(flat_config: dict[str, Any], vocab_sha256: str, data_identity: dict[str, Any],
                       total_steps: int, task_keys: tuple[str, ...] = ()) -> dict:
    """A flat dict of everything a resume must keep (a pure function of the resolved config).
    `data_identity` (e.g. {"total_cells": N}) enters as `data.<key>`."""
    keys = FINGERPRINT_KEYS + tuple(task_keys)
    keep = {k: v for k, v in flat_config.items()
            if (k.startswith(FINGERPRINT_SECTIONS) or k in keys) and k not in NOT_FINGERPRINTED}
    return {**keep, "vocab_sha256": vocab_sha256, **{f"data.{k}": v for k, v in data_identity.items()},
            "total_steps": total_steps}


def fingerprint_differences(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every key that differs, sorted by key."""
    keys = sorted(set(saved) | set(now))
    return [(k, saved.get(k, "<absent>"), now.get(k, "<absent>")) for k in keys if saved.get(k, "<absent>") != now.get(k, "<absent>")]


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs)


@dataclass
class TrainState:
    """Global progress of a run. `step` = optimiser steps done; `batches_done` = micro-batches of
    the current epoch consumed on each rank; `total_steps` fixes the EMA and LR schedules."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    total_steps: int = 0
    fingerprint: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        # ema_step: the EMA schedule position (equal to step: the EMA updates once per step).
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "ema_step": self.step, "total_steps": self.total_steps, "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("ema_step", state["step"]) != state["step"]:
            raise ValueError(f"train state: ema_step {state['ema_step']} != step {state['step']}")
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
