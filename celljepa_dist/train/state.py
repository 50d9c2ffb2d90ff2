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


def planned_total_steps(steps_per_epoch: int, epochs: int, max_steps: int) -> tuple[int, str | None]:
    """Steps the run takes: `epochs` whole epochs, cut at `max_steps` when set. The second value
    is a warning when `max_steps` asks for more than the epochs hold (the run stops earlier)."""
    by_epochs = steps_per_epoch * epochs
    if not max_steps or max_steps <= by_epochs:
        return (min(by_epochs, max_steps) if max_steps else by_epochs), None
    return by_epochs, (f"max_steps={max_steps} but epochs={epochs} allow only {by_epochs} steps "
                       f"({steps_per_epoch} per epoch); the run stops at {by_epochs}. Raise `epochs` to reach "
                       f"max_steps")


def _model_section(fingerprint: dict) -> dict:
    return {k[len("model."):]: v for k, v in fingerprint.items() if k.startswith("model.")}


def _weight_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """Every weight's shape of a CellJEPA with this model config, built on the meta device (no memory)."""
    import torch

    from celljepa_dist.model.cell_jepa import CellJEPA
    from celljepa_dist.model.config import ModelConfig

    with torch.device("meta"):
        module = CellJEPA(ModelConfig.from_dict(model, where="checkpoint fingerprint: model"))
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def shape_change_refusal(saved: dict, now: dict) -> str | None:
    """Why a resume cannot continue even with `allow_config_change`: the model config changes the
    shapes of the weights (d_model, n_layers, d_hid, vocab size, heads, ...), which no load can
    reconcile. Names the model keys responsible; None when every weight keeps its shape."""
    old_model, new_model = _model_section(saved), _model_section(now)
    if old_model == new_model or not old_model:
        return None
    old_shapes, new_shapes = _weight_shapes(old_model), _weight_shapes(new_model)
    changed = sorted(k for k in old_shapes.keys() | new_shapes.keys() if old_shapes.get(k) != new_shapes.get(k))
    if not changed:
        return None
    diffs = fingerprint_differences(old_model, new_model)

    def changes_shapes(key: str) -> bool:  # this key's change alone (an invalid combination counts)
        try:
            return _weight_shapes({**old_model, key: new_model.get(key)}) != old_shapes
        except (ValueError, TypeError, RuntimeError):
            return True

    keys = [d for d in diffs if changes_shapes(d[0])] or diffs
    example = changed[0]
    return (f"the model config changes the shapes of {len(changed)} of {len(old_shapes)} weights "
            f"(e.g. {example}: {old_shapes.get(example, '<absent>')} -> {new_shapes.get(example, '<absent>')}) "
            f"through {describe_differences([(f'model.{k}', a, b) for k, a, b in keys])}. No resume can load "
            "weights into other shapes, --allow-config-change included: resume with the checkpoint's model "
            "config, or train the new size in a new run_dir")
