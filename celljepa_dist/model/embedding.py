"""Token embeddings as in scGPT (paper 2.2.1): gene table + LayerNorm, plus a value embedding."""
from __future__ import annotations

import torch
import torch.nn as nn

from celljepa_dist.tokens import MASK_VALUE, PAD_ID, PAD_VALUE

from .config import ModelConfig


class GeneEmbedding(nn.Module):
    """Gene id -> vector. `<cls>` comes from the same table (paper eq. after 2.1); `<pad>`
    (tokens.PAD_ID) is the padding row."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.require_vocab_size(), cfg.d_model, padding_idx=PAD_ID)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embedding(gene_ids))


class ContinuousValueEmbedding(nn.Module):
    """scGPT's ContinuousValueEncoder: the bin number as a scalar through a small MLP.

    The sentinels (tokens.MASK_VALUE = -1, tokens.PAD_VALUE = -2) go through the same MLP as plain
    numbers, as in scGPT; that is how the masked token gets its own learned embedding f_val(-1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_value = cfg.max_value
        self.linear1 = nn.Linear(1, cfg.d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.unsqueeze(-1).clamp(max=self.max_value).to(self.linear1.weight.dtype)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class CategoryValueEmbedding(nn.Module):
    """Bins as categories: ids 0..n_bins-1, then one id for masked and one (padding_idx) for pad."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_bins = cfg.n_bins
        self.embedding = nn.Embedding(cfg.n_bins + 2, cfg.d_model, padding_idx=cfg.n_bins + 1)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def category_ids(self, values: torch.Tensor) -> torch.Tensor:
        ids = values.round().long().clamp(0, self.n_bins - 1)
        ids = ids.masked_fill(values == MASK_VALUE, self.n_bins)
        return ids.masked_fill(values == PAD_VALUE, self.n_bins + 1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embedding(self.category_ids(values)))


class TokenEmbedding(nn.Module):
    """z_i = f_gene(y_i) + f_val(v_i) (paper eq. 2.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gene = GeneEmbedding(cfg)
        value_cls = ContinuousValueEmbedding if cfg.value_encoder == "continuous" else CategoryValueEmbedding
        self.value = value_cls(cfg)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.gene(gene_ids) + self.value(values)
