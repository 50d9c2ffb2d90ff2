"""The EMA teacher, placed alongside the student for each ZeRO stage.

The teacher is never part of the DeepSpeed engine's module: it must not reach the optimiser and
`exclude_frozen_parameters` would drop it from engine checkpoints. It lives here instead:

* ZeRO 0-2: a full fp32 replica on every rank. EMA source = the student's module parameters cast
  to fp32 (exact for fp32 runs; for bf16/fp16 runs the source is the low-precision copy of the
  master weights, the teacher itself still accumulates in fp32).
* ZeRO 3: the teacher is built under `deepspeed.zero.Init` exactly like the student, so each
  rank's `ds_tensor` of teacher parameter i covers the same slice as the student's; the EMA is a
  shard-local foreach update with no communication. The forward gathers all teacher parameters
  at once (`GatheredParameters`): peak memory = one full fp32 teacher per rank during its forward.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from celljepa_dist.atomic import atomic_path
from celljepa_dist.model.ema import ema_update_


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Teacher:
    def __init__(self, student: nn.Module, zero_stage: int, build_like: Callable[[], nn.Module],
                 ds_config: dict | None = None, rank: int = 0, forward_dtype: torch.dtype = torch.float32):
        """`student` is the engine's student encoder (after deepspeed.initialize for ZeRO-3);
        `build_like` builds a fresh module of the same architecture."""
        self.zero_stage = zero_stage
        self.rank = rank
        # Weights stay fp32 (the EMA needs it); on CUDA the forward may run under autocast so
        # that half-precision kernels (flash-attn) serve the teacher as they serve the student.
        self.forward_dtype = forward_dtype
        self.student = student
        if zero_stage == 3:
            import deepspeed

            if ds_config is None:
                raise ValueError("ZeRO-3 teacher needs ds_config")
            # fp32 via the config, not `dtype=`: DeepSpeed 0.19's Init ignores dtype on CPU
            # (operator precedence in Init._set_dtype) and would build a bf16 teacher.
            fp32_config = {**ds_config, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
            with deepspeed.zero.Init(config_dict_or_path=fp32_config):
                self.module = build_like()
            s_params, t_params = list(student.parameters()), list(self.module.parameters())
            if [p.ds_shape for p in s_params] != [p.ds_shape for p in t_params]:
                raise RuntimeError("ZeRO-3 teacher does not mirror the student's parameters")
            with torch.no_grad():
                for t, s in zip(t_params, s_params):
                    t.ds_tensor.copy_(s.ds_tensor.float())
        else:
            # A fresh module + state_dict rather than deepcopy: DeepSpeed hangs optimiser links
            # (`_hp_mapping`) on ZeRO-1/2 parameters, which a deepcopy would duplicate.
            self.module = build_like().float()
            self.module.load_state_dict({k: v.detach().float() for k, v in student.state_dict().items()})
        self.module.requires_grad_(False)
        # No dropout in the target encoder, as I-JEPA's target encoder.
        self.module.eval()
        device = next(iter(student.parameters())).device
        if zero_stage != 3:
            self.module.to(device)

    # -- the update -----------------------------------------------------------------------
    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        t_params, s_params = list(self.module.parameters()), list(self.student.parameters())
        if self.zero_stage == 3:
            return [p.ds_tensor for p in t_params], [p.ds_tensor for p in s_params]
        return [p.data for p in t_params], [p.data for p in s_params]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, in fp32, local tensors only."""
        teacher, student = self._pairs()
        student = [s if s.dtype == torch.float32 else s.float() for s in student]
        ema_update_(teacher, student, momentum)

    # -- the forward ----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        on_cuda = next(iter(self.student.parameters())).is_cuda
        autocast = torch.autocast("cuda", dtype=self.forward_dtype,
                                  enabled=on_cuda and self.forward_dtype != torch.float32)
        with autocast:
            if self.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                    return self.module(*args, **kwargs)
            return self.module(*args, **kwargs)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered fp32 weights (collective under ZeRO-3: call on every rank)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """ZeRO-3: one shard file per rank; otherwise one file written by rank 0."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.zero_stage == 3:
            shards = [p.ds_tensor.detach().clone() for p in self.module.parameters()]
            _atomic_torch_save({"zero_stage": 3, "shards": shards}, directory / f"shard_rank{self.rank:03d}.pt")
        elif self.rank == 0:
            _atomic_torch_save({"zero_stage": self.zero_stage, "state_dict": self.module.state_dict()},
                               directory / "teacher.pt")

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        if self.zero_stage == 3:
            path = directory / f"shard_rank{self.rank:03d}.pt"
            if not path.exists():
                raise FileNotFoundError(f"teacher shard missing: {path}")
            shards = torch.load(path, map_location="cpu", weights_only=True)["shards"]
            params = list(self.module.parameters())
            if len(shards) != len(params):
                raise RuntimeError(f"{path}: {len(shards)} shards for {len(params)} teacher parameters")
            for p, s in zip(params, shards):
                if p.ds_tensor.shape != s.shape:
                    raise RuntimeError(f"{path}: shard shape {tuple(s.shape)} != {tuple(p.ds_tensor.shape)}")
                p.ds_tensor.copy_(s)
        else:
            path = directory / "teacher.pt"
            if not path.exists():
                raise FileNotFoundError(f"teacher weights missing: {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            self.module.load_state_dict(state, strict=True)
