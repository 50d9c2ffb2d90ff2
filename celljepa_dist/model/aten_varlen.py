"""The `aten` varlen kernel pair of the flash backend: PyTorch's own FlashAttention-2 build.

CUDA builds of PyTorch ship FlashAttention-2's varlen kernels as private aten ops; they return the
log-sum-exp the known/unknown merge needs and take it back in the backward, so the flash backend
runs on a stock CUDA PyTorch without the flash-attn package. Schemas (torch 2.13; read from
`torch.ops.aten._flash_attention_forward.default._schema`):
  _flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
      is_causal, return_debug_mask, *, scale=None, window_size_left=None, ...)
      -> (output, softmax_logsumexp, rng_state, unused, debug_attn_mask)
  _flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
      max_q, max_k, dropout_p, is_causal, rng_state, unused, *, scale=None, ...) -> (dq, dk, dv)
Releases since 2.1 have these positions (2.1-2.4 name the two rng outputs philox_seed and
philox_offset); `check_aten_schema` refuses a build whose schema has moved.

The log-sum-exp's layout is the kernel's: [H, total_q] in the varlen builds of recent releases
(torch's own meta function says so), but FlashAttention-2 before 2.5 returned [B, H, max_q] for
varlen calls, and `torch.nn.attention.varlen.varlen_attn` documents [total_q, H]. The pair below
hands the merge the canonical [H, total_q] (as flash-attn's and the pure-PyTorch pair do) whatever
the build returns, and gives the backward the layout its forward produced (`LseLayout`).
`docs/gpu.md` lists what only a GPU can confirm; `bench/gpu_probe.py` prints it there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .flash_varlen import check_supported

LseKind = Literal["packed", "packed_t", "padded"]


@dataclass(frozen=True)
class LseLayout:
    """How a kernel lays out the log-sum-exp of a varlen batch.

    packed   [H, total_q]     (FlashAttention-2 >= 2.5 varlen; what the merge uses)
    packed_t [total_q, H]     (as `varlen_attn`'s docstring states)
    padded   [B, H, length]   (FlashAttention-2 < 2.5 varlen; length >= max_q, rows past a cell unused)
    """

    kind: LseKind
    length: int = 0  # padded only: the kernel's third dimension


def detect_lse_layout(shape: tuple[int, ...], n_cells: int, total_q: int, n_heads: int, max_q: int) -> LseLayout:
    """The layout of a log-sum-exp of `shape` returned for a varlen batch (pure). [H, total_q] wins
    when H == total_q, since that is the layout every current kernel documents."""
    shape = tuple(int(s) for s in shape)
    if shape == (n_heads, total_q):
        return LseLayout("packed")
    if shape == (total_q, n_heads):
        return LseLayout("packed_t")
    if len(shape) == 3 and shape[:2] == (n_cells, n_heads) and shape[2] >= max_q:
        return LseLayout("padded", shape[2])
    raise ValueError(
        f"varlen log-sum-exp of shape {list(shape)} matches no known layout for {n_cells} cells, "
        f"{total_q} query tokens, {n_heads} heads, max_q={max_q}: expected [H, total_q]={[n_heads, total_q]}, "
        f"[total_q, H] or [B, H, >=max_q]={[n_cells, n_heads, max_q]}"
    )


def _rows_of(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell, position in the cell) of every packed token."""
    counts = cu_seqlens.diff().long()
    cell = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts)
    pos = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - cu_seqlens[:-1].long()[cell]
    return cell, pos


def lse_to_packed(lse: torch.Tensor, layout: LseLayout, cu_seqlens_q: torch.Tensor) -> torch.Tensor:
    """A kernel's log-sum-exp -> [H, total_q] fp32 (contiguous)."""
    if layout.kind == "packed":
        return lse.float().contiguous()
    if layout.kind == "packed_t":
        return lse.float().transpose(0, 1).contiguous()
    cell, pos = _rows_of(cu_seqlens_q)
    return lse[cell, :, pos].float().transpose(0, 1).contiguous()


def lse_from_packed(lse: torch.Tensor, layout: LseLayout, cu_seqlens_q: torch.Tensor) -> torch.Tensor:
    """[H, total_q] -> the kernel's own layout (the inverse of `lse_to_packed` on the valid rows)."""
    if layout.kind == "packed":
        return lse.contiguous()
    if layout.kind == "packed_t":
        return lse.transpose(0, 1).contiguous()
    cell, pos = _rows_of(cu_seqlens_q)
    out = lse.new_zeros((len(cu_seqlens_q) - 1, lse.shape[0], layout.length))
    out[cell, :, pos] = lse.transpose(0, 1)
    return out


# ---- the ops and their schema -------------------------------------------------------------------

_FORWARD_POSITIONAL = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
                       "is_causal", "return_debug_mask")
_BACKWARD_POSITIONAL = ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k",
                        "max_q", "max_k", "dropout_p", "is_causal")


def _schema(op_name: str):
    op = getattr(torch.ops.aten, op_name, None)  # absent from builds without the ops (and very old ones)
    if op is None:
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no torch.ops.aten.{op_name}")
    return op.default._schema


def check_aten_schema() -> None:
    """Raises RuntimeError naming the op and argument when this PyTorch's flash ops do not have
    the positions and the `scale` keyword this module calls them with."""
    for name, positional, n_returns in (("_flash_attention_forward", _FORWARD_POSITIONAL, 5),
                                         ("_flash_attention_backward", _BACKWARD_POSITIONAL, 3)):
        schema = _schema(name)
        args = [a.name for a in schema.arguments]
        if tuple(args[:len(positional)]) != positional:
            raise RuntimeError(f"torch.ops.aten.{name} of PyTorch {torch.__version__} takes {args}; "
                               f"expected {list(positional)} first")
        if "scale" not in args:
            raise RuntimeError(f"torch.ops.aten.{name} of PyTorch {torch.__version__} has no `scale` argument")
        if len(schema.returns) != n_returns:
            raise RuntimeError(f"torch.ops.aten.{name} of PyTorch {torch.__version__} returns "
                               f"{len(schema.returns)} values, expected {n_returns}")


# The layout this build's forward returned, per max_q: the backward of the same batch must hand the
# kernel back exactly that shape (the padded layout's length may depend on max_q). A property of the
# build, so a process-wide record is right.
_FORWARD_LAYOUT: dict[int, LseLayout] = {}


def aten_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                        softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                        alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                        seqused_k=None):
    """flash-attn's `_flash_attn_varlen_forward` contract on the aten op: (out [T, H, D],
    lse [H, T] fp32, None, rng_state)."""
    check_supported("aten", dropout_p, causal, window_size_left, window_size_right, softcap, alibi_slopes)
    out, lse, rng_state, _unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, False, False, scale=softmax_scale)
    layout = detect_lse_layout(lse.shape, len(cu_seqlens_q) - 1, q.shape[0], q.shape[1], max_seqlen_q)
    _FORWARD_LAYOUT[int(max_seqlen_q)] = layout
    return out, lse_to_packed(lse, layout, cu_seqlens_q), None, rng_state


def _rng_placeholders(device) -> tuple[torch.Tensor, torch.Tensor]:
    """What torch's own varlen_attn passes with dropout 0 (the kernel reads neither then)."""
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.empty(0, device=device)


def aten_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left,
                         window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    """flash-attn's `_flash_attn_varlen_backward` contract: writes dq, dk, dv. `softmax_lse` is
    [H, T] (the merged one); `out` the merged output. Determinism is torch's global setting."""
    check_supported("aten", dropout_p, causal, window_size_left, window_size_right, softcap, alibi_slopes)
    lse = lse_from_packed(softmax_lse.float(), _FORWARD_LAYOUT.get(int(max_seqlen_q), LseLayout("packed")), cu_seqlens_q)
    rng, unused = _rng_placeholders(q.device)
    if rng_state is not None:
        rng = rng_state
    grads = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, False, rng, unused,
        scale=softmax_scale)
    for dst, src in zip((dq, dk, dv), grads):
        dst.copy_(src)
    return None
