"""Typed run configuration: `TrainConfig` from YAML + `--set`, its derived values, flattening.

Each component owns its own `Config` dataclass (model, loader, loss, EMA); this module composes
them into `TrainConfig` and adds the training-only parts (optimiser, DeepSpeed, checkpoints,
tracking). The dict <-> dataclass mapping is `typed_config` (one torch-free mechanism for every
config): a key that matches no field is rejected with its full dotted name; errors name the
dotted key.

Derived values are resolved once, never by validation (which is pure):
  - at load (`load_config`, from the raw mapping): `loss.objective` follows `objective`;
    `data.seed` defaults to `seed` (so `--set seed=1` changes the data order too);
  - at run setup (`resolve_for_run`, a new config): `model.vocab_size` from the vocab,
    `model.use_mvc` when the GEPC loss is on, `model.n_bins` checked against the shards.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.data.stream import LoaderConfig
from celljepa_dist.health import HealthThresholds
from celljepa_dist.model.config import LossConfig, ModelConfig, Objective
from celljepa_dist.model.ema import EMAConfig
from celljepa_dist.tokens import accept_legacy_token_keys
from celljepa_dist.typed_config import (  # noqa: F401 (re-exported: the mapping's old home)
    ConfigError,
    apply_override,
    check_choices,
    coerce,
    field_types,
    flatten,
    from_dict,
    invalid,
    to_dict,
)

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

    def validate(self, where: str = "optim") -> None:
        """Raises ConfigError naming `where.field`; pure."""
        if not self.lr > 0:
            raise invalid(where, "lr", self.lr, "must be > 0")
        if self.weight_decay < 0:
            raise invalid(where, "weight_decay", self.weight_decay, "must be >= 0")
        if not 0 < self.lr_decay_per_epoch <= 1:
            raise invalid(where, "lr_decay_per_epoch", self.lr_decay_per_epoch, "must be in (0, 1]")
        if self.warmup_steps < 0:
            raise invalid(where, "warmup_steps", self.warmup_steps, "must be >= 0")
        if self.grad_clip < 0:
            raise invalid(where, "grad_clip", self.grad_clip, "must be >= 0 (0: no clipping)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise invalid(where, "betas", self.betas, "must be two numbers in [0, 1)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_accumulation_steps: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, gloo on CPU
    threads_per_rank: int = 1  # torch intra-op threads on CPU ranks
    steps_per_print: int = 1000000  # DeepSpeed's own logging; we log through tracking
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the generated JSON

    def validate(self, where: str = "deepspeed") -> None:
        """Raises ConfigError naming `where.field`; pure."""
        check_choices(self, where)
        if self.zero_stage not in (0, 1, 2, 3):
            raise invalid(where, "zero_stage", self.zero_stage, "must be 0..3")
        if self.gradient_accumulation_steps < 1:
            raise invalid(where, "gradient_accumulation_steps", self.gradient_accumulation_steps, "must be >= 1")
        if self.threads_per_rank < 0:
            raise invalid(where, "threads_per_rank", self.threads_per_rank, "must be >= 0 (0: torch's default)")


@dataclass
class DistributedConfig:
    """How long ranks wait for each other (docs/training.md, "Faults"). torch's default is 30 minutes: a
    stalled rank would hold every GPU of the job that long before anything is reported."""
    # A collective (all-reduce, barrier) that waits this long for a silent rank fails the job with
    # an error naming the step and that rank (train/collectives.py).
    timeout_s: float = 300.0
    # Setup (until every rank is ready to train) and checkpoint commits: loading and writing every
    # rank's files on a slow shared filesystem, rank 0 alone creating the MLflow run, may
    # legitimately keep some ranks much longer than a training step.
    commit_timeout_s: float = 1800.0
    # Each rank rewrites RUN_DIR/.heartbeat/rank_R this often, from a thread that keeps beating
    # while the rank waits in a collective; the stalled rank is the one whose heartbeat is old.
    heartbeat_s: float = 10.0

    def validate(self, where: str = "distributed") -> None:
        """Raises ConfigError naming `where.field`; pure."""
        if not self.timeout_s > 0:
            raise invalid(where, "timeout_s", self.timeout_s, "must be > 0")
        if self.commit_timeout_s < self.timeout_s:
            raise invalid(where, "commit_timeout_s", self.commit_timeout_s,
                          f"must be >= distributed.timeout_s={self.timeout_s:g} (a commit waits at least as long)")
        if not 0 < self.heartbeat_s <= self.timeout_s / 3:
            raise invalid(where, "heartbeat_s", self.heartbeat_s,
                          f"must be in (0, timeout_s/3 = {self.timeout_s / 3:g}]: a stalled rank's heartbeat "
                          "must be clearly older than the live ones' when a collective times out")


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: only at the end
    keep_last: int = 3
    resume: str = "none"  # none | auto | PATH to a step_XXXXXXXX dir
    # A resume whose model, data, objective or schedule differs from the checkpoint's is refused
    # (train/state.py); true continues under the new values (--allow-config-change).
    allow_config_change: bool = False

    def validate(self, where: str = "checkpoint") -> None:
        """Raises ConfigError naming `where.field`; pure."""
        if self.every_steps < 0:
            raise invalid(where, "every_steps", self.every_steps, "must be >= 0 (0: only at the end)")
        if self.keep_last < 1:
            raise invalid(where, "keep_last", self.keep_last, "must be >= 1")


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

    def validate(self, where: str = "tracking") -> None:
        """Raises ConfigError naming `where.field`; pure."""
        if self.log_every < 1:
            raise invalid(where, "log_every", self.log_every, "must be >= 1")
        if self.peak_tflops < 0:
            raise invalid(where, "peak_tflops", self.peak_tflops, "must be >= 0")
        if self.health_every < 0:
            raise invalid(where, "health_every", self.health_every, "must be >= 0 (0: off)")
        if self.probe_cells < 2:
            raise invalid(where, "probe_cells", self.probe_cells, "must be >= 2 (pairwise metrics)")
        self.health_thresholds.validate(f"{where}.health_thresholds")


@dataclass
class TrainConfig:
    run_dir: str = "runs/pretrain"
    vocab: str = ""  # vocab.json; "" -> <data.shards_dir>/../vocab.json if it exists
    objective: Objective = "celljepa"
    epochs: int = 4
    max_steps: int = 0  # 0: run all epochs; otherwise stop after this many optimiser steps
    seed: int = 0  # weights, dropout, and (unless data.seed is set) the data order and masks
    nonfinite_policy: Literal["stop", "skip"] = "stop"
    deterministic: bool = False  # torch.use_deterministic_algorithms; fault tests turn it on
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)  # data.seed: `seed` unless set
    loss: LossConfig = field(default_factory=LossConfig)  # weights; its objective follows the top level
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "TrainConfig":
        """Raises ConfigError naming the dotted key; pure (never changes the config). Returns self."""
        check_choices(self, "")
        if self.epochs < 1:
            raise invalid("", "epochs", self.epochs, "must be >= 1")
        if self.max_steps < 0:
            raise invalid("", "max_steps", self.max_steps, "must be >= 0 (0: all epochs)")
        if not self.run_dir:
            raise invalid("", "run_dir", self.run_dir, "must be set")
        if self.nonfinite_policy == "skip" and self.deepspeed.zero_stage == 0:
            raise ConfigError("nonfinite_policy=skip needs deepspeed.zero_stage >= 1 "
                              "(ZeRO 1-3 skip the optimiser step on non-finite gradients)")
        if self.loss.objective != self.objective:
            raise invalid("loss", "objective", self.loss.objective,
                          f"must equal objective={self.objective!r}: set the top-level `objective` "
                          "instead (the loss section follows it)")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)
        return self


def derive_defaults(data: dict, cls: type = None) -> dict:
    """The raw config mapping with the values that follow the top level filled in (a new dict).

    `loss.objective` follows `objective` (setting it to anything else is an error); `data.seed`
    defaults to `seed` (an explicit `data.seed` wins) when `cls`'s data section has a seed."""
    cls = cls or TrainConfig
    out = copy.deepcopy(data)
    objective = out.get("objective", cls.objective)
    seed = out.get("seed", cls.seed)
    data_fields = {f.name for f in dataclasses.fields(field_types(cls)["data"])}
    follows = [("loss", "objective", objective)] + ([("data", "seed", seed)] if "seed" in data_fields else [])
    for section, key, value in follows:
        node = out.get(section)
        if node is None:
            node = out[section] = {}
        if not isinstance(node, dict):
            continue  # from_dict names the section and what it got
        if section == "loss" and "objective" in node and node["objective"] != objective:
            raise ConfigError("loss.objective: set the top-level `objective` instead (the loss section follows it)")
        node.setdefault(key, value)
    return out


def read_config_mapping(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                        cls: type = None) -> dict:
    """YAML file (or nothing) + `key=value` overrides -> the raw nested mapping (keys checked against `cls`)."""
    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides:
        apply_override(data, cls or TrainConfig, assignment)
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = None) -> TrainConfig:
    """YAML file (or defaults) + `key=value` overrides -> validated `cls` (TrainConfig, or a
    task's config that extends it: finetuning, perturbation).

    Errors are ConfigError naming the file (when there is one) and the dotted key."""
    cls = cls or TrainConfig
    where = f"{path}: " if path is not None else ""
    try:
        data = derive_defaults(read_config_mapping(path, overrides, cls), cls)
        if "model" in data:  # config.yaml files written before celljepa_dist/tokens.py restate the token contract
            data = {**data, "model": accept_legacy_token_keys(data["model"], "model")}
        return from_dict(cls, data).validate()
    except ValueError as e:  # ConfigError included
        raise ConfigError(f"{where}{e}") from e


def resolve_for_run(cfg: TrainConfig, *, vocab_size: int, manifest_n_bins: int) -> TrainConfig:
    """The config a run trains with, resolved once at setup from what only the run knows (a new,
    validated config; `cfg` is not changed):

    - `model.vocab_size`: the vocab's size (`len(GeneVocab)`) unless the config sets it;
    - `model.use_mvc`: on when the GEPC loss weight is > 0 (the head exists exactly when its loss
      is on: scgpt by default);
    - `model.n_bins` must equal the shards' binning (`manifest.json` `binning.n_bins`);

    (`data.seed` needs nothing here: `load_config` already made it `seed` unless it was set.)
    Sections are deep copies: changing the result never changes `cfg`.
    """
    model = cfg.model
    if model.vocab_size is not None and model.vocab_size < vocab_size:
        raise invalid("model", "vocab_size", model.vocab_size,
                      f"smaller than the vocab ({vocab_size} tokens): token ids would fall outside the embedding")
    if model.n_bins != manifest_n_bins:
        raise invalid("model", "n_bins", model.n_bins,
                      f"the shards are binned with n_bins={manifest_n_bins} (manifest.json); set model.n_bins to match")
    model = dataclasses.replace(
        model,
        vocab_size=vocab_size if model.vocab_size is None else model.vocab_size,
        use_mvc=model.use_mvc or cfg.loss.gepc_weight > 0,
    )
    return dataclasses.replace(copy.deepcopy(cfg), model=model).validate()


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """The resolved config, re-loadable with load_config (written atomically)."""
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
