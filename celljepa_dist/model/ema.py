"""EMA teacher: momentum schedules (pure functions of the step) and the in-place update.

theta_T <- m * theta_T + (1 - m) * theta_S (paper 2.2.2). The teacher stays fp32: with m >= 0.996,
(1 - m) * delta falls below bf16 resolution and a bf16 teacher would stop moving."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence, get_args

import torch

from celljepa_dist.typed_config import check_choices, invalid

from .encoder import CellEncoder

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES = get_args(Schedule)


@dataclass
class EMAConfig:
    schedule: Schedule = "linear"  # I-JEPA: linear from base to final over the whole run
    base: float = 0.996
    final: float = 1.0

    def validate(self, where: str = "EMAConfig") -> "EMAConfig":
        """Raises ConfigError naming `where.field`; pure (never changes the config). Returns self."""
        check_choices(self, where)
        for name in ("base", "final"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise invalid(where, name, getattr(self, name), "must be in [0, 1]")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


def momentum_at(step: int, total_steps: int, schedule: str = "linear", base: float = 0.996, final: float = 1.0) -> float:
    """Momentum for update number `step` (0-based) of a run of `total_steps` updates.

    linear: base + (final - base) * step / total (I-JEPA); cosine: final - (final - base) *
    (1 + cos(pi * step / total)) / 2 (BYOL). Steps past the end stay at `final`."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps}: must be > 0")
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    frac = min(step / total_steps, 1.0)
    if schedule == "constant":
        return base
    if schedule == "linear":
        return base + (final - base) * frac
    if schedule == "cosine":
        return final - (final - base) * (1.0 + math.cos(math.pi * frac)) / 2.0
    raise ValueError(f"schedule={schedule!r}: must be one of {SCHEDULES}")


def momentum_schedule(cfg: EMAConfig, total_steps: int, start_step: int = 0) -> Iterator[float]:
    """Generator à la I-JEPA; `start_step` resumes it exactly where a checkpoint left it."""
    step = start_step
    while True:
        yield momentum_at(step, total_steps, cfg.schedule, cfg.base, cfg.final)
        step += 1


@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """In place, on plain tensor lists (parameters, or ZeRO-3 local shards `param.ds_tensor`).

    The student may be bf16/fp16: the add promotes it to the fp32 teacher's dtype."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: {len(teacher)} teacher tensors vs {len(student)} student tensors")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: tensor {i} shape {tuple(t.shape)} (teacher) != {tuple(s.shape)} (student)")
    if not teacher:
        return
    student = [s.detach() for s in student]
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


def make_teacher(student: CellEncoder) -> CellEncoder:
    """Deep copy of the student encoder in fp32, frozen, in eval mode.

    Eval mode (no dropout) as I-JEPA's target encoder: the JEPA target should be a deterministic
    function of the unmasked cell. Keep the teacher outside the DeepSpeed engine's module (frozen
    params would be dropped from checkpoints with exclude_frozen_parameters) and never call
    .train() on it."""
    teacher = copy.deepcopy(student).float()
    teacher.requires_grad_(False)
    return teacher.eval()


def encoder_params(encoder: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters in a stable order, for pairing teacher and student tensors in ema_update_."""
    return [p for _, p in sorted(encoder.named_parameters(), key=lambda kv: kv[0])]
