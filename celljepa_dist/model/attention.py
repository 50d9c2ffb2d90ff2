"""Self-attention with the known/unknown mask (paper 2.2.3), one module, several backends.

Query i attends key j iff j is known (not masked, not padding) or i == j. Padding is never a key;
a padding query attends only itself, so its row is finite in every backend (the encoder zeroes
padding outputs at the end). `value_mask=None` is plain attention over the non-pad tokens.

The per-batch structure (`AttentionMask`) is built once by the encoder and shared by all layers:
  reference  additive float mask [B, 1, L, L] (0 / -inf), explicit softmax: the readable truth
  sdpa       boolean mask [B, 1, L, L] (None when there is nothing to mask) for F.sdpa
  flex       a FlexAttention BlockMask
  flash      a VarlenLayout: tokens are unpadded once, end to end through the encoder
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flash_varlen import VarlenKernels, VarlenLayout, build_varlen_layout, varlen_known_unknown_attention


@dataclass
class AttentionMask:
    backend: str
    padding_mask: torch.Tensor  # [B, L] True at padding
    dense: Optional[torch.Tensor] = None  # reference: float additive; sdpa: bool (True = attend)
    block_mask: Any = None  # flex
    layout: Optional[VarlenLayout] = None  # flash
    kernels: Optional[VarlenKernels] = None  # flash


def allowed_keys(padding_mask: torch.Tensor, value_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, L, L] bool: may query i attend key j. The definition all backends must agree with."""
    key_known = ~padding_mask if value_mask is None else ~padding_mask & ~value_mask
    eye = torch.eye(padding_mask.shape[1], dtype=torch.bool, device=padding_mask.device)
    return key_known[:, None, :] | eye


def build_reference_mask(padding_mask, value_mask) -> torch.Tensor:
    allowed = allowed_keys(padding_mask, value_mask)
    additive = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return additive.masked_fill_(~allowed, float("-inf")).unsqueeze(1)


def build_sdpa_mask(padding_mask, value_mask) -> Optional[torch.Tensor]:
    if value_mask is None and not bool(padding_mask.any()):
        return None  # nothing to mask: lets SDPA take its fastest path
    return allowed_keys(padding_mask, value_mask).unsqueeze(1)


_compiled_flex = None


def _flex_attention(on_cuda: bool):
    """Compiled on CUDA (eager flex is a slow reference); eager on CPU, where it runs forward only."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not on_cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def build_flex_block_mask(padding_mask, value_mask):
    from torch.nn.attention.flex_attention import create_block_mask

    key_known = ~padding_mask if value_mask is None else ~padding_mask & ~value_mask

    def known_or_self(b, h, q_idx, kv_idx):
        return key_known[b, kv_idx] | (q_idx == kv_idx)

    batch, length = padding_mask.shape
    return create_block_mask(known_or_self, batch, None, length, length, device=padding_mask.device)


def build_attention_mask(backend: str, padding_mask: torch.Tensor, value_mask: Optional[torch.Tensor] = None,
                         kernels: Optional[VarlenKernels] = None) -> AttentionMask:
    if value_mask is not None and bool((value_mask & padding_mask).any()):
        raise ValueError("value_mask is True at padding positions: a padding token cannot be masked")
    mask = AttentionMask(backend=backend, padding_mask=padding_mask)
    if backend == "reference":
        mask.dense = build_reference_mask(padding_mask, value_mask)
    elif backend == "sdpa":
        mask.dense = build_sdpa_mask(padding_mask, value_mask)
    elif backend == "flex":
        mask.block_mask = build_flex_block_mask(padding_mask, value_mask)
    elif backend == "flash":
        if kernels is None:
            raise ValueError("the flash backend needs its varlen kernels (see flash_varlen.resolve_kernels)")
        mask.layout, mask.kernels = build_varlen_layout(padding_mask, value_mask), kernels
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return mask


class KnownUnknownAttention(nn.Module):
    """Multi-head self-attention; parameter names do not depend on the backend, so checkpoints
    move freely between backends (scGPT's flash / non-flash key mismatch, issues #123 #173)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """x: [B, L, d] for the padded backends, [T, d] (unpadded tokens) for flash."""
        scale = 1.0 / math.sqrt(self.head_dim)
        if mask.backend == "flash":
            q, k, v = self.qkv(x).view(x.shape[0], 3, self.n_heads, self.head_dim).unbind(1)
            attn = varlen_known_unknown_attention(q, k, v, mask.layout, mask.kernels, scale)
            return self.out(attn.reshape(x.shape))
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if mask.backend == "reference":
            scores = (q @ k.transpose(-2, -1)) * scale + mask.dense.to(q.dtype)
            attn = torch.softmax(scores, dim=-1) @ v
        elif mask.backend == "sdpa":
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
        elif mask.backend == "flex":
            attn = _flex_attention(x.is_cuda)(q, k, v, block_mask=mask.block_mask, scale=scale)
        else:
            raise ValueError(f"unknown attention backend {mask.backend!r}")
        return self.out(attn.transpose(1, 2).reshape(batch, length, d_model))
