"""`PerturbConfig`: a TrainConfig whose model comes from a pre-trained directory (`init`) and whose
`data` section is a GEARS directory, not shards. Same YAML + `--set` mapping, same validation rules
(pure, errors naming the dotted key). Defaults are the paper's recipe (E.3): lr 1e-4 decayed x0.9
per epoch, batch 64, 15 epochs, rec 1, JEPA 1, ECS 0.8, a frozen teacher (EMA momentum 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from celljepa_dist.config import ConfigError, TrainConfig, derive_defaults, from_dict, invalid, read_config_mapping
from celljepa_dist.model.config import LossConfig
from celljepa_dist.model.ema import EMAConfig

from .split import SUBGROUPS


@dataclass
class PerturbDataConfig:
    gears_dir: str = ""  # holds perturb_processed.h5ad (GEARS' format)
    batch_size: int = 64  # per rank (paper E.3)
    # Tokens per training cell besides <cls>: genes (zeros included, as scGPT's include_zero_gene="all")
    # subsampled to this many, the perturbed genes always kept (scGPT #298 drops them).
    max_genes: int = 1536
    eval_max_genes: int = 0  # 0: every gene of the data at evaluation (GEARS predicts all genes)
    eval_cells_per_perturbation: int = 0  # 0: every cell of a held-out perturbation (GEARS)
    split: Literal["simulation"] = "simulation"
    split_seed: int = 1  # GEARS' PertData.prepare_split default
    train_gene_set_size: float = 0.75
    combo_seen2_train_frac: float = 0.75
    subgroups: list[str] = field(default_factory=lambda: list(SUBGROUPS))  # test subgroups that must be non-empty
    seed: int = 0  # order, control pairing and gene subsampling; defaults to the top-level seed

    def validate(self, where: str = "data") -> None:
        """Raises ConfigError naming `where.field`; pure."""
        if not self.gears_dir:
            raise invalid(where, "gears_dir", self.gears_dir, "must be set (a directory with perturb_processed.h5ad)")
        for name in ("batch_size", "max_genes"):
            if getattr(self, name) < 1:
                raise invalid(where, name, getattr(self, name), "must be >= 1")
        for name in ("eval_max_genes", "eval_cells_per_perturbation"):
            if getattr(self, name) < 0:
                raise invalid(where, name, getattr(self, name), "must be >= 0 (0: all)")
        for name in ("train_gene_set_size", "combo_seen2_train_frac"):
            if not 0 < getattr(self, name) < 1:
                raise invalid(where, name, getattr(self, name), "must be in (0, 1)")
        bad = [g for g in self.subgroups if g not in SUBGROUPS]
        if bad:
            raise invalid(where, "subgroups", self.subgroups, f"{bad} are not GEARS subgroups {list(SUBGROUPS)}")


def _perturb_loss() -> LossConfig:
    return LossConfig(objective="celljepa", w_rec=1.0, w_jepa=1.0, w_ecs=0.8, w_mvc=0.0)


def _frozen_teacher() -> EMAConfig:
    return EMAConfig(schedule="constant", base=1.0, final=1.0)


@dataclass
class PerturbConfig(TrainConfig):
    """`model` is replaced by the init model's config at setup (config.json of `init`); only
    `attention_backend` / `flash_kernel` / `dropout` of this run's `model` section are kept."""

    run_dir: str = "runs/perturb"
    init: str = ""  # a save_pretrained directory (RUN_DIR/model of a pre-training, or launch/export.py)
    epochs: int = 15
    data: PerturbDataConfig = field(default_factory=PerturbDataConfig)
    loss: LossConfig = field(default_factory=_perturb_loss)
    ema: EMAConfig = field(default_factory=_frozen_teacher)
    best_metric: str = "pearson"  # validation metric that picks the best epoch (higher is better)

    def validate(self) -> "PerturbConfig":
        if not self.init:
            raise invalid("", "init", self.init, "must be set: the pre-trained model directory (save_pretrained)")
        super().validate()
        if self.loss.gepc_weight > 0:
            raise invalid("loss", "w_mvc", self.loss.w_mvc, "perturbation training has no GEPC term: set it to 0")
        if self.deepspeed.zero_stage == 3:
            raise invalid("deepspeed", "zero_stage", 3, "perturbation training keeps the best epoch's full weights "
                          "on rank 0: use ZeRO 0-2 (the models it finetunes fit one device)")
        if self.best_metric not in ("pearson", "pearson_delta", "pearson_de", "pearson_de_delta"):
            raise invalid("", "best_metric", self.best_metric,
                          "must be one of pearson, pearson_delta, pearson_de, pearson_de_delta")
        return self


def _derive(data: dict) -> dict:
    """TrainConfig's derived defaults, and a `loss` section that keeps the perturbation defaults."""
    out = derive_defaults(data, PerturbConfig)
    loss = out.get("loss")
    if isinstance(loss, dict):
        base = {"w_rec": 1.0, "w_jepa": 1.0, "w_ecs": 0.8, "w_mvc": 0.0}
        out["loss"] = {**base, **loss}
    return out


def load_perturb_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> PerturbConfig:
    """YAML (or defaults) + `key=value` overrides -> validated PerturbConfig; errors name the file and key."""
    where = f"{path}: " if path is not None else ""
    try:
        data = _derive(read_config_mapping(path, overrides, PerturbConfig))
        return from_dict(PerturbConfig, data).validate()
    except ValueError as e:
        raise ConfigError(f"{where}{e}") from e
