"""Typed configuration of the model library: the encoder/heads (`ModelConfig`) and the loss mix
(`LossConfig`). Each `validate()` raises ValueError naming the offending field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from celljepa_dist.tokens import N_SPECIAL
from celljepa_dist.typed_config import ConfigError, check_choices, from_dict, invalid

AttentionBackend = Literal["reference", "sdpa", "flex", "flash"]
FlashKernel = Literal["auto", "flash_attn", "aten", "torch"]
NormStyle = Literal["post", "pre"]
ValueEncoder = Literal["continuous", "category"]
Objective = Literal["celljepa", "scgpt"]
EcsStyle = Literal["supcon", "scgpt"]

ATTENTION_BACKENDS = get_args(AttentionBackend)
FLASH_KERNELS = get_args(FlashKernel)
NORM_STYLES = get_args(NormStyle)
VALUE_ENCODERS = get_args(ValueEncoder)
OBJECTIVES = get_args(Objective)
ECS_STYLES = get_args(EcsStyle)


def _from_dict(cls, data: dict[str, Any], where: str):
    """Builds and validates a dataclass from a mapping (the project's one mapper, typed_config);
    errors start with `where` (a file, or a dotted path) and name the key."""
    try:
        return from_dict(cls, data).validate()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def _load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return data


@dataclass
class ModelConfig:
    """The scGPT encoder (paper 2.2) plus the Cell-JEPA heads. Defaults are the paper's (E.1)."""

    vocab_size: Optional[int] = None  # None in YAML: taken from the vocab file (len(GeneVocab))
    d_model: int = 512
    n_layers: int = 12
    n_heads: int = 8
    d_hid: int = 512  # FFN width; scGPT and the paper use d_hid == d_model
    dropout: float = 0.2
    norm_style: NormStyle = "post"  # scGPT uses post-norm (nn.TransformerEncoderLayer default)
    layer_norm_eps: float = 1e-5
    attention_backend: AttentionBackend = "sdpa"
    # Varlen kernel pair of the flash backend (flash_varlen.select_flash_kernel): auto = flash-attn 2
    # on CUDA when installed, else PyTorch's own FlashAttention-2 ops (aten), pure PyTorch (torch) on CPU.
    flash_kernel: FlashKernel = "auto"
    value_encoder: ValueEncoder = "continuous"
    n_bins: int = 51
    max_value: float = 512.0  # scGPT clamps continuous input values to this
    # Special token ids and the mask/pad values are not settable: celljepa_dist/tokens.py owns them.
    predictor_hidden: int = 0  # JEPA predictor width; 0 means d_model
    use_mvc: bool = False  # GEPC/MVC head (fine-tuning; off in pre-training as in the paper)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, where: str = "ModelConfig") -> "ModelConfig":
        """Raises ConfigError naming `where.field`; pure (never changes the config). Returns self."""
        def bad(field: str, why: str):
            raise invalid(where, field, getattr(self, field), why)

        check_choices(self, where)
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < N_SPECIAL):
            bad("vocab_size", f"must be an int >= {N_SPECIAL} (the special tokens) or null to take it from the vocab")
        for name in ("d_model", "n_layers", "n_heads", "d_hid", "n_bins"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive int")
        if self.d_model % self.n_heads:
            bad("n_heads", f"must divide d_model={self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if self.attention_backend == "flash" and self.head_dim % 8:
            bad("n_heads", f"flash-attn needs a head dim multiple of 8, got {self.head_dim}")
        if self.n_bins < 2:
            bad("n_bins", "must be >= 2")
        if self.predictor_hidden < 0:
            bad("predictor_hidden", "must be >= 0")
        return self

    def require_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError(
                "ModelConfig.vocab_size is unset: set it from the vocab file (len(GeneVocab.load(path)))"
            )
        return self.vocab_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "ModelConfig") -> "ModelConfig":
        return _from_dict(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        return _from_dict(cls, _load_yaml(path), str(path))


# GEPC (scGPT's cell-prompt generation, MVC) weight when `w_mvc` is not set. scGPT pre-trains with
# GEP + GEPC (paper C.3; Cui et al. 2024): without GEPC nothing trains its <cls> output, so a
# masked-MSE-only "scgpt" baseline would be unfair to it. Cell-JEPA pre-trains with
# reconstruction + JEPA only (paper 2.3); GEPC stays available to it as an ablation.
DEFAULT_GEPC_WEIGHT = {"celljepa": 0.0, "scgpt": 1.0}


@dataclass
class LossConfig:
    """Weights of the objective. Pre-training (paper E.1): rec 1, JEPA 1000; scgpt = GEP + GEPC."""

    objective: Objective = "celljepa"
    w_rec: float = 1.0
    w_jepa: float = 1000.0
    w_mvc: Optional[float] = None  # GEPC; None: the objective's choice (DEFAULT_GEPC_WEIGHT)
    w_ecs: float = 0.0
    # Optional VICReg-style variance/covariance regulariser on the student's <cls> (GeneJEPA uses
    # one; the paper has none): off by default.
    w_var: float = 0.0
    w_cov: float = 0.0
    var_target: float = 1.0  # VICReg's gamma: the per-dimension std the variance term asks for
    ecs_style: EcsStyle = "supcon"  # supcon = Cell-JEPA (paper 2.4.2), scgpt = thresholded (paper C.5)
    ecs_temperature: float = 0.07
    ecs_threshold: float = 0.3

    def validate(self, where: str = "LossConfig") -> "LossConfig":
        """Raises ConfigError naming `where.field`; pure (never changes the config). Returns self."""
        def bad(field: str, why: str):
            raise invalid(where, field, getattr(self, field), why)

        check_choices(self, where)
        for name in ("w_rec", "w_jepa", "w_mvc", "w_ecs", "w_var", "w_cov"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.var_target <= 0:
            bad("var_target", "must be > 0")
        if self.ecs_temperature <= 0:
            bad("ecs_temperature", "must be > 0")
        if not -1.0 <= self.ecs_threshold <= 1.0:
            bad("ecs_threshold", "must be a cosine in [-1, 1]")
        return self

    @property
    def gepc_weight(self) -> float:
        """The GEPC weight in effect: `w_mvc`, or the objective's default when it is not set."""
        return DEFAULT_GEPC_WEIGHT[self.objective] if self.w_mvc is None else float(self.w_mvc)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "LossConfig") -> "LossConfig":
        return _from_dict(cls, data, where)
