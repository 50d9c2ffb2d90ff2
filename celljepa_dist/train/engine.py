"""DeepSpeed set-up: process group, the generated DeepSpeed JSON, the LR schedule, the engine.

Everything DeepSpeed needs is derived from `TrainConfig`; no hand-written JSON exists, so the
run's resolved YAML is the single source of truth (it is saved with every run).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from celljepa_dist.config import TrainConfig
from celljepa_dist.launching import free_port
from celljepa_dist.train.collectives import as_timedelta, set_timeout


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def resolve_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def shm_allreduce_buffer_path(rank: int, env=os.environ) -> Path:
    """Where DeepSpeed's CPU shm all-reduce keeps this rank's ~69 MB workspace (shm.cpp's name)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                               f"{env.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_allreduce_buffer(rank: int) -> None:
    """DeepSpeed 0.19 never unlinks its CPU all-reduce segments: every multi-rank CPU run (and
    every killed one) would leave 69 MB per rank in /dev/shm, i.e. in RAM, until reboot. Once
    every rank has mapped every peer's segment (init_distributed returned everywhere: barrier),
    the names are no longer needed; the mappings stay valid after unlink (POSIX)."""
    import torch.distributed as dist

    dist.barrier()
    shm_allreduce_buffer_path(rank).unlink(missing_ok=True)


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the process group set up by `deepspeed`/`torchrun` (env vars) or start a 1-rank one."""
    import deepspeed

    backend = resolve_backend(cfg.deepspeed.backend)
    # Plain `python launch/pretrain.py`: a single rank; DeepSpeed still wants a process group.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a port free now, not a guess that may be taken
        os.environ["MASTER_PORT"] = str(free_port())
    # Setup's collectives wait distributed.commit_timeout_s, training's timeout_s: not torch's 30 min
    # (train/collectives.py).
    deepspeed.init_distributed(dist_backend=backend, timeout=as_timedelta(cfg.distributed.commit_timeout_s))
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        backend=backend,
    )
    if backend == "gloo":
        unlink_shm_allreduce_buffer(info.rank)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    elif cfg.deepspeed.threads_per_rank > 0:
        # Several CPU ranks share the cores; oversubscription costs more than it gains.
        torch.set_num_threads(cfg.deepspeed.threads_per_rank)
    return info


def build_ds_config(cfg: TrainConfig, world_size: int, on_cuda: bool | None = None) -> dict:
    """The DeepSpeed JSON generated from the typed config (a pure function)."""
    ds, opt = cfg.deepspeed, cfg.optim
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": cfg.data.batch_size * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": opt.grad_clip,
        "steps_per_print": ds.steps_per_print,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                # torch's AdamW on CPU: DeepSpeed's fused kernels are CUDA (or a slow JIT build).
                "torch_adam": not on_cuda,
            },
        },
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        # Small models: keep every parameter partitioned (no persistence threshold), so the
        # teacher/student shard layout is the same for every parameter.
        config["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    if ds.precision == "bf16":
        # Accumulate gradients in fp32: bf16 accumulation loses small updates.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return _deep_merge(config, ds.extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_factor(step: int, steps_per_epoch: int, decay_per_epoch: float, warmup_steps: int) -> float:
    """LR multiplier after `step` optimiser steps: linear warm-up, then x decay per whole epoch."""
    epoch = step // max(1, steps_per_epoch)
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * decay_per_epoch**epoch


class EpochDecay:
    """Picklable LambdaLR callable (LambdaLR saves callable objects' __dict__ in its state)."""

    def __init__(self, steps_per_epoch: int, decay_per_epoch: float, warmup_steps: int):
        self.steps_per_epoch = steps_per_epoch
        self.decay_per_epoch = decay_per_epoch
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.steps_per_epoch, self.decay_per_epoch, self.warmup_steps)


def initialize_engine(cfg: TrainConfig, model: torch.nn.Module, ds_config: dict, steps_per_epoch: int):
    """deepspeed.initialize with the epoch-decay schedule as part of the engine state."""
    import deepspeed

    schedule = EpochDecay(steps_per_epoch, cfg.optim.lr_decay_per_epoch, cfg.optim.warmup_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    set_timeout(cfg.distributed.commit_timeout_s)  # DeepSpeed's own groups (data parallel, ...) got torch's 30 min
    return engine, optimizer, scheduler
