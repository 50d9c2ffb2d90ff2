"""The scGPT transformer encoder (paper 2.2), shared by the student and the EMA teacher."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import AttentionMask, KnownUnknownAttention, build_attention_mask
from .config import ModelConfig
from .embedding import TokenEmbedding
from .flash_varlen import resolve_kernels


class Block(nn.Module):
    """Attention + ReLU MLP, each with residual dropout, post-norm (scGPT) or pre-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm_style == "pre"
        self.attn = KnownUnknownAttention(cfg.d_model, cfg.n_heads)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_hid), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.d_hid, cfg.d_model)
        )
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout1(self.attn(self.norm1(x), mask))
            return x + self.dropout2(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self.attn(x, mask)))
        return self.norm2(x + self.dropout2(self.mlp(x)))


class CellEncoder(nn.Module):
    """(gene_ids, values, padding_mask, value_mask) -> hidden [B, L, d]; cell embedding = hidden[:, 0].

    Padding positions of the output are zero in every backend. The backend is a plain attribute
    (`self.backend`): parameters are identical across backends."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backend = cfg.attention_backend
        self.embed = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_style == "pre" else None
        # scGPT initialises the gene table uniformly in +-0.1.
        nn.init.uniform_(self.embed.gene.embedding.weight, -0.1, 0.1)

    def build_mask(self, padding_mask: torch.Tensor, value_mask: Optional[torch.Tensor]) -> AttentionMask:
        kernels = resolve_kernels(self.cfg.flash_kernel, padding_mask.device) if self.backend == "flash" else None
        return build_attention_mask(self.backend, padding_mask, value_mask, kernels)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor,
                value_mask: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`extra` [B, L, d]: added to the token embeddings (perturbation training's flag embedding,
        paper 2.5: z = f_gene + f_pert + f_val); None for every other use."""
        if gene_ids.shape != values.shape or gene_ids.shape != padding_mask.shape:
            raise ValueError(
                f"gene_ids {tuple(gene_ids.shape)}, values {tuple(values.shape)} and padding_mask "
                f"{tuple(padding_mask.shape)} must have the same [B, L] shape"
            )
        mask = self.build_mask(padding_mask, value_mask)
        if self.backend == "flash":
            return self._forward_unpadded(gene_ids, values, padding_mask, mask, extra)
        x = self.embed(gene_ids, values)
        if extra is not None:
            x = x + extra.to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x.masked_fill(padding_mask.unsqueeze(-1), 0.0)

    def _forward_unpadded(self, gene_ids, values, padding_mask, mask: AttentionMask, extra=None) -> torch.Tensor:
        """Varlen end to end: padding is dropped before the embedding and restored at the very end."""
        idx = mask.layout.token_idx
        x = self.embed(gene_ids.flatten()[idx], values.flatten()[idx])
        if extra is not None:
            x = x + extra.flatten(0, 1)[idx].to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        batch, length = padding_mask.shape
        hidden = x.new_zeros(batch * length, x.shape[-1]).index_copy(0, idx, x)
        return hidden.view(batch, length, -1)
