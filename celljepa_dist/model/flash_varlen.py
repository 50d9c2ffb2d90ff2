"""The `flash` backend's core: known/unknown attention on unpadded (varlen) tokens.

Every query attends the gathered *known* keys of its cell through one varlen kernel call; a masked
query's own key (the only unknown key it may see) is merged in exactly by log-sum-exp:
    lse = logaddexp(lse_K, s_ii),  out = exp(lse_K - lse) * out_K + exp(s_ii - lse) * v_i.
flash-attn does not backpropagate through `softmax_lse`, so the merge lives in its own autograd
Function: the kernel's backward is called with the *merged* out and lse (which makes its
probabilities and its rowsum(dout * out) term those of the full softmax), and the self term's
gradient is added by hand.

The kernel pair is injected (`VarlenKernels`, chosen by `ModelConfig.flash_kernel` through
`select_flash_kernel`): flash-attn 2's private varlen forward/backward on CUDA, PyTorch's own
FlashAttention-2 aten ops on CUDA (`aten_varlen.py`: no extra package), or
`torch_varlen_forward/backward` below, a pure-PyTorch implementation with the same signatures and
semantics, so the merge and the autograd Function run for real in CPU tests.
Signatures follow flash-attn 2.7/2.8 `flash_attn/flash_attn_interface.py`:
  _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
      alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None)
      -> (out [total_q, H, D], softmax_lse [H, total_q] fp32, S_dmask, rng_state)
  _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
      cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
      window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None)
      -> softmax_d; writes dq, dk, dv in place.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import FLASH_KERNELS


@dataclass(frozen=True)
class VarlenKernels:
    forward: Callable
    backward: Callable
    name: str
    low_precision_only: bool  # flash-attn runs fp16/bf16 only


@dataclass
class VarlenLayout:
    """Where the tokens of a padded [B, L] batch go once unpadded; built once per batch."""

    token_idx: torch.Tensor  # [T] flat positions (b * L + i) of the non-pad tokens, cell by cell
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    key_idx: torch.Tensor  # [K] positions in the packed tokens of the keys (known tokens)
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    max_seqlen_k: int
    self_idx: torch.Tensor  # [S] packed positions of the masked queries (their own key is merged)


def _cu_seqlens(counts: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def build_varlen_layout(padding_mask: torch.Tensor, value_mask: Optional[torch.Tensor]) -> VarlenLayout:
    nonpad = ~padding_mask
    lengths = nonpad.sum(1)
    token_idx = nonpad.flatten().nonzero().squeeze(1)
    if value_mask is None:
        known = torch.ones_like(token_idx, dtype=torch.bool)
        n_known = lengths
    else:
        known = ~value_mask.flatten()[token_idx]
        n_known = (nonpad & ~value_mask).sum(1)
    # One host sync per batch (not per layer) for the max lengths the kernel wants as ints.
    max_q, max_k = (int(x) for x in torch.stack([lengths.max(), n_known.max()]).tolist())
    return VarlenLayout(
        token_idx=token_idx,
        cu_seqlens_q=_cu_seqlens(lengths),
        max_seqlen_q=max_q,
        key_idx=known.nonzero().squeeze(1),
        cu_seqlens_k=_cu_seqlens(n_known),
        max_seqlen_k=max_k,
        self_idx=(~known).nonzero().squeeze(1),
    )


# ---- pure-PyTorch varlen kernels (padded per cell; for CPU tests and debugging) ----------------


def _rows(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell, position in cell) of every packed row."""
    counts = cu_seqlens.diff().long()
    cell = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts)
    pos = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - cu_seqlens[:-1].long()[cell]
    return cell, pos


def _padded(x: torch.Tensor, rows, n_cells: int, max_len: int) -> torch.Tensor:
    out = x.new_zeros((n_cells, max_len) + tuple(x.shape[1:]), dtype=torch.float32)
    out[rows] = x.float()
    return out


def _padded_scores(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    n_cells = len(cu_seqlens_q) - 1
    rows_q, rows_k = _rows(cu_seqlens_q), _rows(cu_seqlens_k)
    qp, kp = _padded(q, rows_q, n_cells, max_seqlen_q), _padded(k, rows_k, n_cells, max_seqlen_k)
    key_valid = torch.zeros(n_cells, max_seqlen_k, dtype=torch.bool, device=q.device)
    key_valid[rows_k] = True
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kp) * softmax_scale
    return scores.masked_fill(~key_valid[:, None, None, :], float("-inf")), qp, kp, rows_q, rows_k


def check_supported(kernel: str, dropout_p, causal, window_size_left, window_size_right, softcap, alibi_slopes):
    """What the non-flash-attn kernels (`torch`, `aten`) of flash-attn's varlen contract implement."""
    if dropout_p or causal or window_size_left != -1 or window_size_right != -1 or softcap or alibi_slopes is not None:
        raise NotImplementedError(f"{kernel} varlen kernel: only dropout_p=0, non-causal, no window/softcap/alibi")


def torch_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                         softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                         alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                         seqused_k=None):
    check_supported("torch", dropout_p, causal, window_size_left, window_size_right, softcap, alibi_slopes)
    scores, _, _, rows_q, rows_k = _padded_scores(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  softmax_scale)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Lq]; -inf for a query with no keys
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    vp = _padded(v, rows_k, len(cu_seqlens_q) - 1, max_seqlen_k)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vp)[rows_q].to(q.dtype)
    lse_packed = lse[rows_q[0], :, rows_q[1]].transpose(0, 1).contiguous()  # [H, total_q] as flash
    return out, lse_packed, torch.empty(0, dtype=q.dtype), None


def torch_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                          max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left,
                          window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    check_supported("torch", dropout_p, causal, window_size_left, window_size_right, softcap, alibi_slopes)
    n_cells = len(cu_seqlens_q) - 1
    scores, qp, kp, rows_q, rows_k = _padded_scores(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                    max_seqlen_k, softmax_scale)
    # Probabilities from the lse we are given, as flash does: that is what makes the merge work.
    lse = torch.full((n_cells, scores.shape[1], max_seqlen_q), float("inf"), device=q.device)
    lse[rows_q[0], :, rows_q[1]] = softmax_lse.transpose(0, 1).float()
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    dout_p, vp = _padded(dout, rows_q, n_cells, max_seqlen_q), _padded(v, rows_k, n_cells, max_seqlen_k)
    softmax_d = (dout.float() * out.float()).sum(-1)  # [total_q, H] = rowsum(dout * out)
    d_p = torch.zeros(n_cells, scores.shape[1], max_seqlen_q, device=q.device)
    d_p[rows_q[0], :, rows_q[1]] = softmax_d
    dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout_p, vp) - d_p.unsqueeze(-1))
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", dscores, kp)[rows_q] * softmax_scale)
    dk.copy_(torch.einsum("bhqk,bqhd->bkhd", dscores, qp)[rows_k] * softmax_scale)
    dv.copy_(torch.einsum("bhqk,bqhd->bkhd", probs, dout_p)[rows_k])
    return softmax_d.transpose(0, 1)


TORCH_KERNELS = VarlenKernels(torch_varlen_forward, torch_varlen_backward, "torch", low_precision_only=False)


FLASH_ATTN_MISSING = ("flash_kernel='flash_attn' needs flash-attn 2 (pip install 'celljepa-dist[gpu]') and CUDA; "
                      "use flash_kernel='auto' (PyTorch's own aten kernels on CUDA), 'torch' for the pure-PyTorch "
                      "varlen kernel, or another backend")


def flash_attn_kernels() -> VarlenKernels:
    try:
        from flash_attn import flash_attn_interface as fai
    except ImportError as err:
        raise RuntimeError(FLASH_ATTN_MISSING) from err
    # The torch.ops-wrapped variants exist from 2.7 on; older releases expose the plain functions.
    fwd = getattr(fai, "_wrapped_flash_attn_varlen_forward", fai._flash_attn_varlen_forward)
    bwd = getattr(fai, "_wrapped_flash_attn_varlen_backward", fai._flash_attn_varlen_backward)
    return VarlenKernels(fwd, bwd, "flash_attn", low_precision_only=True)


def aten_kernels() -> VarlenKernels:
    """PyTorch's FlashAttention-2 varlen ops (aten_varlen.py); refuses a build whose schema moved."""
    from .aten_varlen import aten_varlen_backward, aten_varlen_forward, check_aten_schema

    check_aten_schema()
    return VarlenKernels(aten_varlen_forward, aten_varlen_backward, "aten", low_precision_only=True)


def select_flash_kernel(requested: str, device_type: str, has_flash_attn: bool, has_aten: bool) -> str:
    """Which varlen kernel pair the flash backend runs (pure): `requested` is ModelConfig.flash_kernel.

    auto: on CUDA flash-attn 2 when installed (the package the user asked for by installing it),
    else PyTorch's own aten flash kernels, else the pure-PyTorch pair; elsewhere the pure-PyTorch
    pair (the CUDA kernels do not run there). An explicit choice is honoured or refused, never
    swapped for another."""
    if requested == "torch":
        return "torch"
    if requested not in FLASH_KERNELS:
        raise ValueError(f"flash_kernel={requested!r}: expected one of {', '.join(FLASH_KERNELS)}")
    if device_type != "cuda":
        if requested == "auto":
            return "torch"
        raise RuntimeError(f"flash_kernel={requested!r} runs on CUDA only, the model is on {device_type!r}: "
                           "use flash_kernel='auto' or 'torch'")
    if requested == "flash_attn" or (requested == "auto" and has_flash_attn):
        if not has_flash_attn:
            raise RuntimeError(FLASH_ATTN_MISSING)
        return "flash_attn"
    if has_aten:
        return "aten"
    if requested == "aten":
        raise RuntimeError("flash_kernel='aten': this PyTorch build has no usable FlashAttention-2 kernels "
                           f"(torch {torch.__version__}; they need an sm80+ GPU): use flash_kernel='torch'")
    return "torch"


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def aten_flash_available(device: torch.device) -> bool:
    """PyTorch's flash ops can run here: a CUDA build with them, an sm80+ device."""
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    return bool(built()) and torch.cuda.get_device_capability(device)[0] >= 8


@functools.lru_cache(maxsize=None)
def _resolve(requested: str, device_type: str, device_index) -> VarlenKernels:
    on_cuda = device_type == "cuda"
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    name = select_flash_kernel(requested, device_type, on_cuda and flash_attn_installed(),
                               on_cuda and aten_flash_available(device))
    if name == "torch" and requested == "auto" and on_cuda:
        warnings.warn("flash backend on CUDA without flash-attn or PyTorch's flash kernels: using the pure-PyTorch "
                      "varlen kernel (correct, slow, memory ~ B*H*L^2)", stacklevel=3)
    return {"torch": lambda: TORCH_KERNELS, "aten": aten_kernels, "flash_attn": flash_attn_kernels}[name]()


def resolve_kernels(choice: str, device: torch.device) -> VarlenKernels:
    """The kernel pair for `ModelConfig.flash_kernel` on `device` (`select_flash_kernel`); probed
    once per (choice, device): the encoder asks for every batch."""
    device = torch.device(device)
    return _resolve(choice, device.type, device.index)


# ---- the merge and its autograd Function --------------------------------------------------------


class KnownUnknownVarlenAttention(torch.autograd.Function):
    """q, k, v: [T, H, D] packed tokens. Returns [T, H, D]."""

    @staticmethod
    def forward(ctx, q, k, v, layout: VarlenLayout, kernels: VarlenKernels, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        k_known, v_known = k[layout.key_idx], v[layout.key_idx]
        args = (layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k)
        out, lse = kernels.forward(q, k_known, v_known, *args, 0.0, scale, False)[:2]
        idx = layout.self_idx
        if idx.numel():
            s_self = (q[idx].float() * k[idx].float()).sum(-1) * scale  # [S, H]
            lse_known = lse[:, idx].transpose(0, 1)
            lse_merged = torch.logaddexp(lse_known, s_self)
            w_known = torch.exp(lse_known - lse_merged).unsqueeze(-1)
            w_self = torch.exp(s_self - lse_merged).unsqueeze(-1)
            out = out.clone()
            out[idx] = (w_known * out[idx].float() + w_self * v[idx].float()).to(out.dtype)
            lse = lse.clone()
            lse[:, idx] = lse_merged.transpose(0, 1)
        ctx.save_for_backward(q, k, v, k_known, v_known, out, lse)
        ctx.layout, ctx.kernels, ctx.scale = layout, kernels, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_known, v_known, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        dout = dout.contiguous()
        dq, dk_known, dv_known = torch.empty_like(q), torch.empty_like(k_known), torch.empty_like(v_known)
        ctx.kernels.backward(
            dout, q, k_known, v_known, out, lse, dq, dk_known, dv_known,
            layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k,
            0.0, scale, False, -1, -1, 0.0, None, False, None,
        )
        dk = torch.zeros_like(k).index_copy_(0, layout.key_idx, dk_known)
        dv = torch.zeros_like(v).index_copy_(0, layout.key_idx, dv_known)
        idx = layout.self_idx
        if idx.numel():
            q_s, k_s, v_s, do_s = q[idx].float(), k[idx].float(), v[idx].float(), dout[idx].float()
            p_self = torch.exp((q_s * k_s).sum(-1) * scale - lse[:, idx].transpose(0, 1))  # [S, H]
            softmax_d = (do_s * out[idx].float()).sum(-1)
            dscore = (p_self * ((do_s * v_s).sum(-1) - softmax_d) * scale).unsqueeze(-1)
            dq[idx] += (dscore * k_s).to(dq.dtype)
            dk[idx] += (dscore * q_s).to(dk.dtype)
            dv[idx] += (p_self.unsqueeze(-1) * do_s).to(dv.dtype)
        return dq, dk, dv, None, None, None


def varlen_known_unknown_attention(q, k, v, layout: VarlenLayout, kernels: VarlenKernels, scale: float):
    """Casts to bf16 around flash-attn when the model runs in fp32 (autograd handles the casts)."""
    dtype = q.dtype
    if kernels.low_precision_only and dtype not in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    return KnownUnknownVarlenAttention.apply(q, k, v, layout, kernels, scale).to(dtype)
