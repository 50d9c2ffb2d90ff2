"""Typed run configuration: YAML -> nested dataclasses, `--set` overrides, flattening for MLflow.

Each component owns its own `Config` dataclass (model, loader); this module composes them into
`TrainConfig` and adds the training-only parts (optimiser, EMA, DeepSpeed, checkpoints, tracking).
The mapping is generic: any dataclass field whose type is itself a dataclass becomes a nested
YAML section, and a key that matches no field is rejected with its full dotted name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.data.stream import LoaderConfig
from celljepa_dist.health import HealthThresholds
from celljepa_dist.model.config import LossConfig, ModelConfig
from celljepa_dist.model.ema import EMAConfig
from celljepa_dist.tokens import accept_legacy_token_keys


# --------------------------------------------------------------------------------------------
# Generic dict <-> dataclass mapping
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field type `tp`; strings from `--set` are parsed."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys raise naming the dotted key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        dotted = [f"{prefix}.{k}" if prefix else str(k) for k in unknown]
        raise ConfigError(
            f"unknown config key(s) {dotted}; valid keys under {prefix or '<root>'}: {sorted(types)}"
        )
    kwargs = {}
    for name, tp in types.items():
        if name in data:
            kwargs[name] = coerce(data[name], tp, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_override(data: dict, cls, assignment: str) -> None:
    """Apply one `a.b.c=value` to the nested dict `data`, checking the path against `cls`."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        types = _field_types(node_cls)
        if part not in types:
            where = ".".join(parts[:i]) or "<root>"
            raise ConfigError(f"--set {dotted}: unknown key {part!r} under {where}; valid: {sorted(types)}")
        tp, _ = _unwrap_optional(types[part])
        if i == len(parts) - 1:
            # Keep the raw string; from_dict coerces it by the field type (so `1e-4` -> float).
            node[part] = raw if not dataclasses.is_dataclass(tp) else yaml.safe_load(raw)
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is not a section")
            node = node.setdefault(part, {})
            node_cls = tp


def flatten(obj, prefix: str = "") -> dict[str, Any]:
    """`{"optim.lr": 1e-4, ...}` for MLflow params."""
    out: dict[str, Any] = {}
    items = to_dict(obj).items() if dataclasses.is_dataclass(obj) else obj.items()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------------------------
# Training-side sections
# --------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_decay_per_epoch: float = 0.9  # paper E.1: lr x0.9 after each epoch (a step function)
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.lr_decay_per_epoch <= 1:
            raise ValueError(f"optim.lr_decay_per_epoch must be in (0, 1], got {self.lr_decay_per_epoch}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_accumulation_steps: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, gloo on CPU
    threads_per_rank: int = 1  # torch intra-op threads on CPU ranks
    steps_per_print: int = 1000000  # DeepSpeed's own logging; we log through tracking
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the generated JSON

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0..3, got {self.zero_stage}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"deepspeed.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if self.threads_per_rank < 0:
            raise ValueError(f"deepspeed.threads_per_rank must be >= 0, got {self.threads_per_rank}")


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: only at the end
    keep_last: int = 3
    resume: str = "none"  # none | auto | PATH to a step_XXXXXXXX dir
    # A resume whose model, data, objective or schedule differs from the checkpoint's is refused
    # (train/state.py); true continues under the new values (--allow-config-change).
    allow_config_change: bool = False

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" -> sqlite:///<run_dir>/../mlflow.db (a local store shared by sibling runs)
    experiment: str = "celljepa-pretrain"
    run_name: str = ""
    log_every: int = 1
    peak_tflops: float = 0.0  # per rank; 0 (CPU) -> MFU is not logged
    progress: bool = True
    # Representation health (docs/health.md): the probe cells' <cls> embeddings every
    # `health_every` steps and at each commit. Off when health_every is 0 or probe_shards is "".
    health_every: int = 50
    probe_shards: str = ""  # a shard dir built with the training vocab, held out from training
    probe_cells: int = 256  # the first N cells of probe_shards, in shard order
    health_thresholds: HealthThresholds = field(default_factory=HealthThresholds)

    @property
    def health_enabled(self) -> bool:
        return self.health_every > 0 and bool(self.probe_shards)

    def validate(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"tracking.log_every must be >= 1, got {self.log_every}")
        if self.peak_tflops < 0:
            raise ValueError(f"tracking.peak_tflops must be >= 0, got {self.peak_tflops}")
        if self.health_every < 0:
            raise ValueError(f"tracking.health_every must be >= 0 (0: off), got {self.health_every}")
        if self.probe_cells < 2:
            raise ValueError(f"tracking.probe_cells must be >= 2 (pairwise metrics), got {self.probe_cells}")
        self.health_thresholds.validate()


@dataclass
class TrainConfig:
    run_dir: str = "runs/pretrain"
    vocab: str = ""  # vocab.json; "" -> <data.shards_dir>/../vocab.json if it exists
    objective: Literal["celljepa", "scgpt"] = "celljepa"
    epochs: int = 4
    max_steps: int = 0  # 0: run all epochs; otherwise stop after this many optimiser steps
    seed: int = 0
    nonfinite_policy: Literal["stop", "skip"] = "stop"
    deterministic: bool = False  # torch.use_deterministic_algorithms; fault tests turn it on
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # weights; its objective mirrors the top level
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if not self.run_dir:
            raise ValueError("run_dir must be set")
        if self.nonfinite_policy == "skip" and self.deepspeed.zero_stage == 0:
            raise ValueError("nonfinite_policy=skip needs deepspeed.zero_stage >= 1 "
                             "(ZeRO 1-3 skip the optimiser step on non-finite gradients)")
        # One switch for the paper's central comparison: the loss section follows it.
        self.loss.objective = self.objective
        for section in (self.model, self.data, self.loss, self.optim, self.ema, self.deepspeed,
                        self.checkpoint, self.tracking):
            section.validate()
        return self


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """YAML file (or defaults) + `key=value` overrides -> validated TrainConfig."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides:
        apply_override(data, TrainConfig, assignment)
    loss = data.get("loss")
    if isinstance(loss, dict) and loss.get("objective", data.get("objective", "celljepa")) != data.get("objective", "celljepa"):
        raise ConfigError("loss.objective: set the top-level `objective` instead (the loss section follows it)")
    try:
        if "model" in data:  # config.yaml files written before celljepa_dist/tokens.py restate the token contract
            data = {**data, "model": accept_legacy_token_keys(data["model"], "model")}
        cfg = from_dict(TrainConfig, data)
        cfg.validate()
    except ValueError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from e
    return cfg


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """The resolved config, re-loadable with load_config (written atomically)."""
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
