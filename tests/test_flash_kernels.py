"""The flash backend's kernel pairs: which pair `flash_kernel` picks (a pure function, over its whole
grid), the log-sum-exp layouts of PyTorch's aten flash ops, the aten pair's plumbing on meta
tensors (CPU), and on CUDA every backend against `reference` at the paper's attention shape."""
import dataclasses
import itertools
import math

import pytest
import torch

from celljepa_dist.model import CellEncoder, KnownUnknownAttention, ModelConfig, build_attention_mask
from celljepa_dist.model.aten_varlen import (
    LseLayout,
    check_aten_schema,
    detect_lse_layout,
    lse_from_packed,
    lse_to_packed,
)
from celljepa_dist.model.flash_varlen import (
    TORCH_KERNELS,
    KnownUnknownVarlenAttention,
    aten_kernels,
    build_varlen_layout,
    resolve_kernels,
    select_flash_kernel,
)
from celljepa_dist.model.synthetic import random_batch

# ---- selection --------------------------------------------------------------------------------

# On CUDA, (requested, flash-attn installed, aten ops usable) -> pair, or the error's key phrase.
CUDA_EXPECTED = {
    ("auto", True, True): "flash_attn", ("auto", True, False): "flash_attn",
    ("auto", False, True): "aten", ("auto", False, False): "torch",
    ("flash_attn", True, True): "flash_attn", ("flash_attn", True, False): "flash_attn",
    ("flash_attn", False, True): "needs flash-attn", ("flash_attn", False, False): "needs flash-attn",
    ("aten", True, True): "aten", ("aten", False, True): "aten",
    ("aten", True, False): "no usable FlashAttention-2", ("aten", False, False): "no usable FlashAttention-2",
    ("torch", True, True): "torch", ("torch", True, False): "torch",
    ("torch", False, True): "torch", ("torch", False, False): "torch",
}


@pytest.mark.parametrize("requested,has_flash_attn,has_aten",
                         list(itertools.product(["auto", "flash_attn", "aten", "torch"], [True, False], [True, False])))
@pytest.mark.parametrize("device_type", ["cuda", "cpu", "mps"])
def test_select_flash_kernel_grid(requested, has_flash_attn, has_aten, device_type):
    if device_type == "cuda":
        want = CUDA_EXPECTED[(requested, has_flash_attn, has_aten)]
    else:  # the CUDA kernels never run elsewhere: auto is the pure-PyTorch pair, a CUDA pair is refused
        want = {"auto": "torch", "torch": "torch"}.get(requested, "runs on CUDA only")
    if want in ("flash_attn", "aten", "torch"):
        assert select_flash_kernel(requested, device_type, has_flash_attn, has_aten) == want
    else:
        with pytest.raises(RuntimeError, match=want):
            select_flash_kernel(requested, device_type, has_flash_attn, has_aten)


def test_select_flash_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match="flash_kernel='fast'.*auto, flash_attn, aten, torch"):
        select_flash_kernel("fast", "cuda", True, True)


def test_auto_on_a_machine_without_cuda_runs_the_pure_pytorch_pair():
    assert resolve_kernels("auto", torch.device("cpu")) is TORCH_KERNELS
    with pytest.raises(RuntimeError, match="CUDA only"):
        resolve_kernels("aten", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA only"):
        resolve_kernels("flash_attn", torch.device("cpu"))
    # The encoder's own path: a flash model with the default flash_kernel trains on CPU.
    b = random_batch([9, 4, 1], vocab_size=40, mask_ratio=0.4, seed=0)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_hid=16, dropout=0.0,
                      attention_backend="flash")
    assert cfg.flash_kernel == "auto"
    enc = CellEncoder(cfg)
    assert enc.build_mask(b["padding_mask"], b["value_mask"]).kernels is TORCH_KERNELS
    enc(b["gene_ids"], b["values"], b["padding_mask"], b["value_mask"]).sum().backward()


def test_flash_kernel_option_accepts_aten_and_refuses_others():
    assert ModelConfig(flash_kernel="aten").flash_kernel == "aten"
    with pytest.raises(ValueError, match="flash_kernel"):
        ModelConfig.from_dict({"flash_kernel": "reference"})


# ---- log-sum-exp layouts ----------------------------------------------------------------------

LENS, HEADS = [3, 1, 5], 2


def _cell_lses(seed=0):
    """Per cell, per head, per position: an arbitrary lse value (what the layouts hold)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(HEADS, n, generator=gen) for n in LENS]


def _in_layout(per_cell, kind, length=0):
    """Builds each layout by explicit loops, independently of the module's gather/scatter."""
    total = sum(LENS)
    if kind == "padded":
        out = torch.full((len(LENS), HEADS, length), float("nan"))
        for c, x in enumerate(per_cell):
            out[c, :, :x.shape[1]] = x
        return out
    packed = torch.empty(HEADS, total)
    start = 0
    for x in per_cell:
        packed[:, start:start + x.shape[1]] = x
        start += x.shape[1]
    return packed if kind == "packed" else packed.t().contiguous()


@pytest.mark.parametrize("kind,length", [("packed", 0), ("packed_t", 0), ("padded", 5), ("padded", 8)])
def test_lse_layouts_round_trip_to_the_packed_layout(kind, length):
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    per_cell = _cell_lses()
    native = _in_layout(per_cell, kind, length)
    layout = detect_lse_layout(native.shape, n_cells=3, total_q=9, n_heads=HEADS, max_q=5)
    assert layout == LseLayout(kind, length)
    packed = lse_to_packed(native, layout, cu)
    assert packed.shape == (HEADS, 9) and packed.dtype == torch.float32
    torch.testing.assert_close(packed, _in_layout(per_cell, "packed"))
    back = lse_from_packed(packed, layout, cu)
    assert back.shape == native.shape
    valid = ~native.isnan()
    torch.testing.assert_close(back[valid], native[valid])


def test_lse_layout_prefers_heads_first_when_ambiguous_and_names_bad_shapes():
    assert detect_lse_layout((4, 4), n_cells=2, total_q=4, n_heads=4, max_q=3).kind == "packed"
    with pytest.raises(ValueError, match=r"shape \[3, 2, 4\].*max_q=5"):
        detect_lse_layout((3, 2, 4), n_cells=3, total_q=9, n_heads=2, max_q=5)  # shorter than max_q
    with pytest.raises(ValueError, match=r"shape \[2, 10\]"):
        detect_lse_layout((2, 10), n_cells=3, total_q=9, n_heads=2, max_q=5)


# ---- the aten pair without a GPU: schema and plumbing ------------------------------------------


def test_this_pytorch_has_the_aten_flash_schema_the_pair_calls():
    check_aten_schema()  # the CPU build registers the ops' schemas (and meta kernels) too


def _on_meta(layout):
    return dataclasses.replace(layout, **{f.name: getattr(layout, f.name).to("meta") for f in dataclasses.fields(layout)
                                          if torch.is_tensor(getattr(layout, f.name))})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aten_pair_runs_the_merge_forward_and_backward_on_meta_tensors(dtype):
    """Meta tensors run the ops' real schemas and shape functions: argument order, keywords,
    dtypes and the lse shape the merge indexes all bind as on a GPU, without one."""
    b = random_batch([13, 9, 4, 1, 13, 7], vocab_size=60, mask_ratio=0.4, seed=0, fully_masked=[1], unmasked=[2])
    layout = _on_meta(build_varlen_layout(b["padding_mask"], b["value_mask"]))
    assert layout.self_idx.numel() > 0  # the self-term merge runs
    total, heads, dim = layout.token_idx.shape[0], 4, 16
    q, k, v = (torch.empty(total, heads, dim, device="meta", dtype=dtype, requires_grad=True) for _ in range(3))
    out = KnownUnknownVarlenAttention.apply(q, k, v, layout, aten_kernels(), 0.25)
    assert out.shape == (total, heads, dim) and out.dtype == dtype
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and t.grad.dtype == dtype


def test_aten_pair_forward_hands_the_merge_the_packed_lse_on_meta():
    kernels = aten_kernels()
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32, device="meta")
    q = torch.empty(9, 2, 8, device="meta", dtype=torch.bfloat16)
    k = torch.empty(6, 2, 8, device="meta", dtype=torch.bfloat16)
    cu_k = torch.tensor([0, 2, 3, 6], dtype=torch.int32, device="meta")
    out, lse = kernels.forward(q, k, k, cu, cu_k, 5, 3, 0.0, 0.3, False)[:2]
    assert out.shape == (9, 2, 8) and lse.shape == (2, 9) and lse.dtype == torch.float32
    with pytest.raises(NotImplementedError, match="dropout_p=0"):
        kernels.forward(q, k, k, cu, cu_k, 5, 3, 0.1, 0.3, False)


# ---- GPU: the real kernels at the paper's attention shape ----------------------------------------

D_MODEL, N_HEADS = 512, 8
# Very different lengths, a <cls>-only cell, a cell with every gene masked and one with none.
GPU_LENGTHS = [601, 2, 300, 1, 601, 57, 450, 601]
GPU_FULLY_MASKED, GPU_UNMASKED = [5], [2, 6]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _attention_fwd_bwd(attn, x, pad, vm, backend, kernels, weight):
    """Output and the gradients of input and weights of one attention layer, padding zeroed."""
    attn.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    mask = build_attention_mask(backend, pad, vm, kernels)
    if backend == "flash":
        idx = mask.layout.token_idx
        packed = attn(x.reshape(-1, x.shape[-1])[idx], mask)
        out = packed.new_zeros(x.shape[0] * x.shape[1], x.shape[-1]).index_copy(0, idx, packed).view_as(x)
    else:
        out = attn(x, mask)
    out = out.masked_fill(pad.unsqueeze(-1), 0.0)
    (out.float() * weight).sum().backward()
    return out.detach().float(), x.grad.masked_fill(pad.unsqueeze(-1), 0.0).float(), \
        {n: p.grad.float().clone() for n, p in attn.named_parameters()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backend", ["flash", "flex", "sdpa"])
def test_backend_matches_reference_at_paper_shape_on_gpu(backend, dtype):
    """d=512, 8 heads, L=601, 15% masked: forward and every gradient against `reference` run in
    fp32 on the same (dtype-rounded) weights and inputs. flash runs the aten pair (bf16 inside)."""
    torch.manual_seed(0)
    b = random_batch(GPU_LENGTHS, vocab_size=1000, mask_ratio=0.15, seed=11, fully_masked=GPU_FULLY_MASKED,
                     unmasked=GPU_UNMASKED)
    pad, vm = b["padding_mask"].cuda(), b["value_mask"].cuda()
    assert not vm[GPU_UNMASKED].any() and vm.any()
    attn = KnownUnknownAttention(D_MODEL, N_HEADS).cuda().to(dtype)
    x = torch.randn(*pad.shape, D_MODEL, device="cuda", dtype=dtype)
    weight = torch.randn(*pad.shape, D_MODEL, device="cuda")
    kernels = resolve_kernels("aten", torch.device("cuda")) if backend == "flash" else None
    got = _attention_fwd_bwd(attn, x, pad, vm, backend, kernels, weight)
    ref = _attention_fwd_bwd(attn.float(), x.float(), pad, vm, "reference", None, weight)
    low_precision = dtype == torch.bfloat16 or backend == "flash"
    tol = 2e-2 if low_precision else 1e-3
    assert _rel(got[0], ref[0]) < tol, "output"
    assert _rel(got[1], ref[1]) < tol, "input gradient"
    for name, g in ref[2].items():
        assert _rel(got[2][name], g) < tol, name
    # Padding rows and the masked queries' outputs are finite; the fully masked cell still trains.
    assert torch.isfinite(got[0]).all() and got[1][GPU_FULLY_MASKED].abs().sum() > 0


@pytest.mark.gpu
def test_aten_pair_kernel_outputs_and_lse_match_the_pure_pytorch_pair_on_gpu():
    """Kernel level: out and lse of the aten forward, and dq/dk/dv of its backward given an lse
    (here its own), against the pure-PyTorch pair, which the CPU tests pin to a per-cell softmax."""
    torch.manual_seed(0)
    lens_q, lens_k, heads, dim = [601, 1, 77, 300], [580, 1, 60, 301], 8, 64
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), heads, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = 1 / math.sqrt(dim)
    aten = resolve_kernels("aten", torch.device("cuda"))
    args = (cu_q, cu_k, max(lens_q), max(lens_k), 0.0, scale, False)
    out_a, lse_a = aten.forward(q, k, v, *args)[:2]
    out_t, lse_t = TORCH_KERNELS.forward(q, k, v, *args)[:2]
    assert lse_a.shape == (heads, sum(lens_q)) and lse_a.dtype == torch.float32
    torch.testing.assert_close(lse_a, lse_t, atol=1e-2, rtol=1e-3)
    assert _rel(out_a, out_t) < 1e-2
    dout = torch.randn_like(q)
    grads = {}
    for name, kern, out, lse in (("aten", aten, out_a, lse_a), ("torch", TORCH_KERNELS, out_t, lse_t)):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kern.backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, scale, False,
                      -1, -1, 0.0, None, False, None)
        grads[name] = (dq, dk, dv)
    for a, t in zip(grads["aten"], grads["torch"]):
        assert _rel(a, t) < 2e-2


@pytest.mark.gpu
def test_public_varlen_attn_lse_layout_agrees_with_the_aten_pair_on_gpu():
    """torch.nn.attention.varlen.varlen_attn (2.10+) returns the same lse, in a layout the pair
    can name; what a future switch to the public API would have to handle."""
    import inspect

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    if "return_aux" not in inspect.signature(varlen.varlen_attn).parameters:
        pytest.skip(f"torch {torch.__version__}: varlen_attn returns no lse (no return_aux)")
    lens, heads, dim = [601, 3, 200], 8, 64
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lens), heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = varlen.varlen_attn(q, k, v, cu, cu, max(lens), max(lens), return_aux=varlen.AuxRequest(lse=True))
    layout = detect_lse_layout(lse.shape, len(lens), sum(lens), heads, max(lens))
    aten = resolve_kernels("aten", torch.device("cuda"))
    out_a, lse_a = aten.forward(q, k, v, cu, cu, max(lens), max(lens), 0.0, 1 / math.sqrt(dim), False)[:2]
    torch.testing.assert_close(lse_to_packed(lse, layout, cu), lse_a)
    torch.testing.assert_close(out, out_a)
