"""`FinetuneConfig`: a `TrainConfig` whose run starts from a pre-trained model directory (`init`) and
reads a labelled h5ad (paper 2.4, E.2) instead of shards.

Everything the shared training loop reads (optimiser, DeepSpeed, EMA, checkpoints, tracking, loss
weights) keeps its pre-training meaning; what differs:

  - `init`: a save_pretrained directory (RUN_DIR/model). Its architecture, vocabulary and
    tokenisation (n_bins, max_genes) are the finetuned model's, so the `model` section may only
    set how the same function is computed (`attention_backend`, `flash_kernel`); any other model
    key must equal the init's (a saved config.yaml, which restates them, still loads);
  - `data`: `FinetuneDataConfig`, a labelled h5ad, its 9:1 stratified split and masking;
  - `loss.w_jepa` follows the pre-training run of `init` (paper E.2 "we inherit the JEPA loss
    weight from pretraining") unless `inherit_w_jepa: false`; resolved at run setup
    (`resolve_w_jepa`), never by validation (which is pure).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from celljepa_dist.config import TrainConfig, load_config, read_config_mapping
from celljepa_dist.model.config import ModelConfig
from celljepa_dist.typed_config import ConfigError, invalid

# What a finetuning config may set in its `model` section: how, not what, the model computes.
MODEL_RUNTIME_KEYS = ("attention_backend", "flash_kernel")
# Resolved at setup from the init and the loss (vocab size, the GEPC head): a saved config.yaml
# holds the resolved values, which may differ from the init's config.json.
MODEL_DERIVED_KEYS = ("vocab_size", "use_mvc")


@dataclass
class FinetuneDataConfig:
    """A labelled h5ad -> training and validation cells (finetune/data.py)."""

    h5ad: str = ""
    label_key: str = "cell_type"  # obs column of the cell types (ECS labels, AvgBIO labels)
    gene_key: Optional[str] = None  # var column with gene ids/symbols; None: var_names
    layer: Optional[str] = None  # AnnData layer instead of X (raw counts or normalised, never scaled)
    min_vocab_fraction: float = 0.05  # of the init's vocab genes the h5ad must hold (zero_shot/genes.py)
    batch_size: int = 64  # per rank (paper E.2: 64)
    max_genes: Optional[int] = None  # None: the init's training max_genes (its config.json data section)
    mask_ratio: float = 0.4  # paper E.2
    val_fraction: float = 0.1  # 9:1 train/validation
    split_seed: int = 42  # the split's seed; separate from `seed` (order, masks) so both can vary alone
    # Order and masking seed; `seed` unless set (config.derive_defaults), as in pre-training.
    seed: int = 0
    known_first: bool = False  # <cls>, known genes, then masked genes (collate.py)

    def validate(self, where: str = "data") -> None:
        """Raises ConfigError naming `where.field`; pure."""
        if not self.h5ad:
            raise invalid(where, "h5ad", self.h5ad, "must be set (a labelled .h5ad file)")
        if not self.label_key:
            raise invalid(where, "label_key", self.label_key, "must name an obs column")
        if self.batch_size < 2:
            raise invalid(where, "batch_size", self.batch_size, "must be >= 2 (ECS compares cells of a batch)")
        if self.max_genes is not None and self.max_genes < 1:
            raise invalid(where, "max_genes", self.max_genes, "must be >= 1 or null (the init's)")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise invalid(where, "mask_ratio", self.mask_ratio, "must be in [0, 1]")
        if not 0.0 < self.val_fraction < 1.0:
            raise invalid(where, "val_fraction", self.val_fraction, "must be in (0, 1)")
        if not 0.0 <= self.min_vocab_fraction <= 1.0:
            raise invalid(where, "min_vocab_fraction", self.min_vocab_fraction, "must be in [0, 1]")


@dataclass
class FinetuneEvalConfig:
    """The end of the run: embed validation and all cells, AvgBIO beside PCA, UMAP PNGs."""

    enabled: bool = True
    batch_size: int = 64  # cells per embedding forward
    umap: bool = True

    def validate(self, where: str = "eval") -> None:
        if self.batch_size < 1:
            raise invalid(where, "batch_size", self.batch_size, "must be >= 1")


@dataclass
class FinetuneConfig(TrainConfig):
    run_dir: str = "runs/finetune"
    init: str = ""  # save_pretrained directory of the pre-trained model (RUN_DIR/model)
    inherit_w_jepa: bool = True  # loss.w_jepa := the pre-training run's (paper E.2)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)  # type: ignore[assignment]
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)

    def validate(self) -> "FinetuneConfig":
        if not self.init:
            raise invalid("", "init", self.init, "must be set (a save_pretrained directory, e.g. RUN_DIR/model)")
        super().validate()
        return self


def check_model_section(model_section: dict, init_model: dict, where: str) -> None:
    """A finetuning config's `model` keys: the runtime ones, or the init's own values."""
    for key, value in sorted(model_section.items()):
        if key in MODEL_RUNTIME_KEYS or key in MODEL_DERIVED_KEYS:
            continue
        if key not in init_model:
            continue  # from_dict names unknown keys
        want = init_model[key]
        try:
            same = ModelConfig.from_dict({key: value}).to_dict()[key] == want
        except ValueError:
            same = False
        if not same:
            raise ConfigError(f"{where}model.{key}={value!r}: the finetuned model's architecture is the init's "
                              f"({key}={want!r} in its config.json); only model.{'/'.join(MODEL_RUNTIME_KEYS)} may "
                              "be set for finetuning")


def init_model_dict(init: str) -> dict | None:
    """The init's config.json `model` mapping, or None when there is none yet (setup names that)."""
    path = Path(init) / "config.json"
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("model") or {})
    except (OSError, ValueError):
        return None


def load_finetune_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """YAML (+ `--set key=value`) -> validated FinetuneConfig (config.load_config with this class);
    then the `model` keys checked against the init's. Errors name the file and the dotted key."""
    cfg = load_config(path, overrides, cls=FinetuneConfig)
    section = read_config_mapping(path, overrides, cls=FinetuneConfig).get("model") or {}
    init_model = init_model_dict(cfg.init)
    if isinstance(section, dict) and init_model is not None:
        check_model_section(section, init_model, f"{path}: " if path is not None else "")
    return cfg


def finetune_model_config(cfg: FinetuneConfig, init_model: ModelConfig, vocab_size: int) -> ModelConfig:
    """The finetuned model: the init's architecture, this config's attention kernel, the GEPC head
    when its loss is on (a fresh head when the init has none: celljepa pre-trains without GEPC)."""
    if init_model.vocab_size != vocab_size:
        raise ValueError(f"{cfg.init}: model vocab_size={init_model.vocab_size} but its vocab.json has "
                         f"{vocab_size} tokens")
    return dataclasses.replace(
        init_model, attention_backend=cfg.model.attention_backend, flash_kernel=cfg.model.flash_kernel,
        use_mvc=init_model.use_mvc or cfg.loss.gepc_weight > 0).validate()
