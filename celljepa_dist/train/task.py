"""What a training task supplies to the one training loop (`train/loop.py`).

Pre-training, finetuning and perturbation training share everything a run needs to be trusted:
the DeepSpeed engine, the EMA teacher per ZeRO stage, committed checkpoints with exact resume,
MLflow tracking, the LR decay per epoch, loss logs and NaN checks. They differ only in what is
listed here: how the config is resolved, which model is built (and from which weights), which
batches an epoch has, which losses a batch gives, and what happens after an epoch and at the end.

`Task` is the interface; `TaskBase` gives the optional hooks their do-nothing defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

if TYPE_CHECKING:
    from celljepa_dist.config import TrainConfig
    from celljepa_dist.train.engine import DistInfo
    from celljepa_dist.train.teacher import Teacher


@dataclass
class Prepared:
    """What a task resolves once at setup, before any engine exists."""

    cfg: "TrainConfig"  # the config the run trains with (a new object; the task's own config class)
    vocab_path: Path | None  # copied into the run dir (None: the task has no gene vocabulary)
    vocab_sha256: str
    tokenisation: dict  # {"n_bins", "max_genes", "binning_rule"}: what an export must record
    data_identity: dict  # what identifies the data: joins the config fingerprint as `data.<key>`
    batches_per_epoch: int  # micro-batches per rank and epoch
    cells_per_batch: int  # per rank (throughput metrics)
    fingerprint_keys: tuple[str, ...] = ()  # flat config keys that define the run beyond the shared ones
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the task keeps for later hooks


@dataclass
class TeacherSpec:
    """The encoder whose EMA copy is the teacher, and how to build an empty module like it."""

    source: torch.nn.Module
    build_like: Callable[[], torch.nn.Module]


class Loader(Protocol):
    """One epoch's batches on one rank, resumable at a batch boundary."""

    def __iter__(self): ...

    def state_dict(self, consumed: int) -> dict: ...

    def stats(self) -> dict[str, int]: ...


class Task(Protocol):
    name: str  # "pretrain" | "finetune" | "perturb": progress bar, MLflow tag

    def prepare(self, cfg: "TrainConfig", info: "DistInfo") -> Prepared: ...

    def build_model(self, cfg: "TrainConfig", ds_config: dict) -> torch.nn.Module:
        """Same weights on every rank (fresh from cfg.seed, or loaded from a pre-trained dir)."""

    def teacher(self, module: torch.nn.Module, cfg: "TrainConfig") -> TeacherSpec | None:
        """`module` is the engine's module; None: the run has no teacher."""

    def init_teacher(self, teacher: "Teacher") -> None:
        """A fresh start only (a resume loads the checkpoint's teacher)."""

    def open_loader(self, cfg: "TrainConfig", info: "DistInfo", epoch: int, resume_state: dict | None,
                    prepared: Prepared) -> Loader: ...

    def loss_terms(self, cfg: "TrainConfig") -> list[str]:
        """Keys of `losses` that are logged and checked for NaN; the first is the total, "loss"."""

    def losses(self, out: Any, batch: dict, teacher: "Teacher | None", cfg: "TrainConfig") -> dict[str, torch.Tensor]:
        """`out` = engine(batch). Must hold every key of `loss_terms`."""

    def flop_params(self, module: torch.nn.Module) -> int: ...

    def after_epoch(self, tr) -> dict[str, float]:
        """Collective, every rank, at the end of each full epoch (before a commit at that step):
        validation metrics to log. May change task state (best epoch)."""

    def finish(self, tr) -> None:
        """Every rank, after the last commit (the run's own products: export, evaluation)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TaskBase:
    """Defaults for the optional hooks: no teacher initialisation, nothing after an epoch or at
    the end, no task state, FLOPs from every non-embedding parameter."""

    name = "task"

    def init_teacher(self, teacher) -> None:
        pass

    def flop_params(self, module: torch.nn.Module) -> int:
        from celljepa_dist.train.loop import count_nonembedding_params

        return count_nonembedding_params(module)

    def after_epoch(self, tr) -> dict[str, float]:
        return {}

    def finish(self, tr) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"task {self.name!r} keeps no state, but the checkpoint holds {sorted(state)}")
