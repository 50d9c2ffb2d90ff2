"""Every attention backend against `reference` (and `reference` against a loop over the paper's
definition): forward, input and weight gradients, padding, varying lengths, 0%/100% masked cells."""
import math

import pytest
import torch

from celljepa_dist.model import CellEncoder, KnownUnknownAttention, ModelConfig, allowed_keys, build_attention_mask
from celljepa_dist.model.flash_varlen import (
    TORCH_KERNELS,
    build_varlen_layout,
    torch_varlen_backward,
    torch_varlen_forward,
)
from celljepa_dist.model.synthetic import random_batch

LENGTHS = [13, 9, 4, 1, 13, 7]  # padding, varying lengths, a <cls>-only cell
FULLY_MASKED, UNMASKED = (1, 4), (2,)


def make_batch(seed=0, lengths=LENGTHS, mask_ratio=0.4):
    n = len(lengths)
    return random_batch(lengths, vocab_size=60, mask_ratio=mask_ratio, seed=seed,
                        fully_masked=[i for i in FULLY_MASKED if i < n], unmasked=[i for i in UNMASKED if i < n])


def tiny_cfg(**kw):
    base = dict(vocab_size=60, d_model=32, n_layers=2, n_heads=4, d_hid=40, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def test_batch_covers_the_edge_cases():
    b = make_batch()
    genes = ~b["padding_mask"]
    genes[:, 0] = False
    assert b["padding_mask"].any() and not b["value_mask"][:, 0].any()
    for i in FULLY_MASKED:
        assert torch.equal(b["value_mask"][i], genes[i]) and genes[i].any()
    for i in UNMASKED:
        assert not b["value_mask"][i].any()


def test_allowed_keys_matches_the_paper_definition():
    b = make_batch(seed=3)
    pad, vm = b["padding_mask"], b["value_mask"]
    allowed = allowed_keys(pad, vm)
    B, L = pad.shape
    for bi in range(B):
        for i in range(L):
            for j in range(L):
                known = not pad[bi, j] and not vm[bi, j]
                want = known or i == j  # padding queries attend themselves only (well defined)
                assert bool(allowed[bi, i, j]) == want, (bi, i, j)
    plain = allowed_keys(pad, None)
    for bi in range(B):
        for i in range(L):
            for j in range(L):
                assert bool(plain[bi, i, j]) == (not pad[bi, j] or i == j)


def naive_attention(x, attn: KnownUnknownAttention, pad, vm):
    """Loop over cells and queries with an explicit softmax over the allowed keys."""
    B, L, d = x.shape
    H, hd = attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(B, L, 3, H, hd).unbind(2)
    rows = []
    for b in range(B):
        for i in range(L):
            keys = [j for j in range(L) if (not pad[b, j] and (vm is None or not vm[b, j])) or i == j]
            s = torch.einsum("hd,khd->hk", q[b, i], k[b, keys]) / math.sqrt(hd)
            rows.append(torch.einsum("hk,khd->hd", torch.softmax(s, -1), v[b, keys]).reshape(d))
    return attn.out(torch.stack(rows).view(B, L, d))


def run_attention(attn, x, pad, vm, backend):
    mask = build_attention_mask(backend, pad, vm, TORCH_KERNELS if backend == "flash" else None)
    if backend == "flash":
        layout = mask.layout
        packed = attn(x.reshape(-1, x.shape[-1])[layout.token_idx], mask)
        return torch.zeros(x.shape[0] * x.shape[1], x.shape[-1]).index_copy(0, layout.token_idx, packed).view_as(x)
    return attn(x, mask)


def grads_of(attn, x, pad, vm, backend, weight):
    attn.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = run_attention(attn, x, pad, vm, backend)
    out = out.masked_fill(pad.unsqueeze(-1), 0.0)
    (out * weight).sum().backward()
    return out.detach(), x.grad.masked_fill(pad.unsqueeze(-1), 0.0), {n: p.grad.clone() for n, p in attn.named_parameters()}


@pytest.mark.parametrize("masked", [True, False], ids=["known_unknown", "plain"])
def test_reference_backend_equals_loop(masked):
    torch.manual_seed(0)
    b = make_batch(seed=1)
    attn = KnownUnknownAttention(32, 4)
    x = torch.randn(*b["gene_ids"].shape, 32)
    vm = b["value_mask"] if masked else None
    want = naive_attention(x, attn, b["padding_mask"], vm)
    got = run_attention(attn, x, b["padding_mask"], vm, "reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("masked", [True, False], ids=["known_unknown", "plain"])
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_backend_matches_reference_fwd_bwd(backend, masked, seed):
    torch.manual_seed(seed)
    b = make_batch(seed=seed)
    pad, vm = b["padding_mask"], (b["value_mask"] if masked else None)
    attn = KnownUnknownAttention(32, 4)
    x = torch.randn(*pad.shape, 32)
    weight = torch.randn(*pad.shape, 32)
    ref = grads_of(attn, x, pad, vm, "reference", weight)
    got = grads_of(attn, x, pad, vm, backend, weight)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=2e-5, rtol=1e-4)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("norm_style", ["post", "pre"])
def test_encoder_backends_agree_fwd_and_all_weight_grads(backend, norm_style):
    torch.manual_seed(0)
    b = make_batch(seed=2)
    enc = CellEncoder(tiny_cfg(norm_style=norm_style))
    weight = torch.randn(*b["gene_ids"].shape, 32)
    results = {}
    for be in ("reference", backend):
        enc.backend = be
        enc.zero_grad()
        values = b["values"].clone().requires_grad_(True)
        hidden = enc(b["gene_ids"], values, b["padding_mask"], b["value_mask"])
        (hidden * weight).sum().backward()
        results[be] = (hidden.detach(), values.grad.clone(), {n: p.grad.clone() for n, p in enc.named_parameters()})
    ref, got = results["reference"], results[backend]
    torch.testing.assert_close(got[0], ref[0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=5e-5, rtol=1e-4)
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, atol=1e-4, rtol=1e-4, msg=name)
    assert torch.equal(got[0][b["padding_mask"]], torch.zeros_like(got[0][b["padding_mask"]]))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flash"])
def test_no_nan_with_padding_and_fully_masked_cells(backend):
    torch.manual_seed(0)
    b = make_batch(seed=5, mask_ratio=1.0)
    enc = CellEncoder(tiny_cfg(attention_backend=backend, flash_kernel="torch"))
    hidden = enc(b["gene_ids"], b["values"], b["padding_mask"], b["value_mask"])
    hidden.sum().backward()
    assert torch.isfinite(hidden).all()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_masked_tokens_do_not_see_each_other():
    """Changing a masked token's gene changes only its own output among the masked positions
    and, since no known query attends it, nothing else at all."""
    torch.manual_seed(0)
    b = make_batch(seed=4, lengths=[10, 10], mask_ratio=0.5)
    enc = CellEncoder(tiny_cfg()).eval()
    masked = b["value_mask"][0].nonzero().flatten().tolist()
    assert len(masked) >= 2
    base = enc(b["gene_ids"], b["values"], b["padding_mask"], b["value_mask"])
    ids = b["gene_ids"].clone()
    ids[0, masked[0]] = 59 if ids[0, masked[0]] != 59 else 58
    moved = enc(ids, b["values"], b["padding_mask"], b["value_mask"])
    changed = (moved - base).abs().amax(-1) > 1e-6
    assert changed[0, masked[0]]
    assert changed.sum() == 1


def test_teacher_view_depends_on_every_token():
    torch.manual_seed(0)
    b = make_batch(seed=4, lengths=[10, 6])
    enc = CellEncoder(tiny_cfg()).eval()
    base = enc(b["gene_ids"], b["target_values"], b["padding_mask"], None)
    vals = b["target_values"].clone()
    vals[0, 5] += 3
    moved = enc(b["gene_ids"], vals, b["padding_mask"], None)
    assert ((moved[0] - base[0]).abs().amax(-1) > 1e-6).all()  # every token of cell 0 sees it
    torch.testing.assert_close(moved[1], base[1])  # cells never mix


def test_torch_varlen_kernel_matches_per_cell_softmax():
    torch.manual_seed(0)
    lens_q, lens_k = [3, 1, 5], [2, 1, 4]
    H, D = 2, 8
    q, k, v = torch.randn(sum(lens_q), H, D), torch.randn(sum(lens_k), H, D), torch.randn(sum(lens_k), H, D)
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 3, 7], dtype=torch.int32)
    out, lse, _, _ = torch_varlen_forward(q, k, v, cu_q, cu_k, 5, 4, 0.0, 0.3, False)
    for c in range(3):
        qs, ks = slice(int(cu_q[c]), int(cu_q[c + 1])), slice(int(cu_k[c]), int(cu_k[c + 1]))
        s = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * 0.3
        torch.testing.assert_close(lse[:, qs], torch.logsumexp(s, -1))
        torch.testing.assert_close(out[qs], torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[ks]))
    # The backward equals autograd through the same dense computation.
    qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn_like(out)
    outs = []
    for c in range(3):
        qs, ks = slice(int(cu_q[c]), int(cu_q[c + 1])), slice(int(cu_k[c]), int(cu_k[c + 1]))
        s = torch.einsum("qhd,khd->hqk", qa[qs], ka[ks]) * 0.3
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), va[ks]))
    (torch.cat(outs) * dout).sum().backward()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    torch_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, 5, 4, 0.0, 0.3, False, -1, -1, 0.0, None, False)
    torch.testing.assert_close(dq, qa.grad)
    torch.testing.assert_close(dk, ka.grad)
    torch.testing.assert_close(dv, va.grad)


def test_varlen_layout_counts():
    b = make_batch()
    layout = build_varlen_layout(b["padding_mask"], b["value_mask"])
    assert layout.cu_seqlens_q.tolist() == [0] + torch.tensor(LENGTHS).cumsum(0).tolist()
    n_known = ((~b["padding_mask"]) & ~b["value_mask"]).sum(1)
    assert layout.cu_seqlens_k.diff().tolist() == n_known.tolist()
    assert layout.self_idx.numel() == int(b["value_mask"].sum())
    assert layout.max_seqlen_q == max(LENGTHS) and layout.max_seqlen_k == int(n_known.max())


def test_flex_forward_matches_reference_on_cpu():
    """FlexAttention runs forward-only on CPU in torch 2.13 (backward raises there): the gradient
    comparison is the gpu-marked test below."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    b = make_batch(seed=6)
    enc = CellEncoder(tiny_cfg()).eval()
    with torch.no_grad():
        for vm in (b["value_mask"], None):
            enc.backend = "reference"
            ref = enc(b["gene_ids"], b["values"], b["padding_mask"], vm)
            enc.backend = "flex"
            got = enc(b["gene_ids"], b["values"], b["padding_mask"], vm)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_bad_masks_are_rejected():
    b = make_batch()
    vm = b["value_mask"].clone()
    vm[0, -1] = False
    vm[3, -1] = True  # cell 3 is padding there
    with pytest.raises(ValueError, match="padding"):
        build_attention_mask("sdpa", b["padding_mask"], vm)
    with pytest.raises(ValueError, match="backend"):
        build_attention_mask("nope", b["padding_mask"], None)


# ---- GPU: the real kernels --------------------------------------------------------------------


def _gpu_compare(backend, tol):
    """Relative L2 error of the hidden states and of every weight gradient."""
    torch.manual_seed(0)
    b = make_batch(seed=7, lengths=[601, 300, 17, 1, 601, 450], mask_ratio=0.15)
    b = {k: v.cuda() for k, v in b.items()}
    cfg = ModelConfig(vocab_size=60, d_model=128, n_layers=2, n_heads=4, d_hid=128, dropout=0.0,
                      flash_kernel="flash_attn")
    enc = CellEncoder(cfg).cuda()
    weight = torch.randn(*b["gene_ids"].shape, 128, device="cuda")
    results = {}
    for be in ("reference", backend):
        enc.backend = be
        enc.zero_grad()
        hidden = enc(b["gene_ids"], b["values"], b["padding_mask"], b["value_mask"])
        (hidden.float() * weight).sum().backward()
        results[be] = (hidden.float().detach(), {n: p.grad.clone() for n, p in enc.named_parameters()})

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-6))

    assert rel(results[backend][0], results["reference"][0]) < tol
    for name, g in results["reference"][1].items():
        assert rel(results[backend][1][name], g) < tol, name


@pytest.mark.gpu
def test_flash_attn_backend_matches_reference_on_gpu():
    pytest.importorskip("flash_attn")
    _gpu_compare("flash", 2e-2)  # flash runs bf16 inside: bf16-level tolerance


@pytest.mark.gpu
def test_flex_backend_matches_reference_on_gpu():
    _gpu_compare("flex", 1e-3)


def test_flash_path_casts_fp32_models_to_bf16_for_low_precision_kernels(monkeypatch):
    """flash-attn runs bf16 only: with such kernels an fp32 model still trains, at bf16 accuracy."""
    from dataclasses import replace

    import celljepa_dist.model.encoder as encoder_mod

    bf16_only = replace(TORCH_KERNELS, name="torch-bf16", low_precision_only=True)
    monkeypatch.setattr(encoder_mod, "resolve_kernels", lambda choice, device: bf16_only)
    torch.manual_seed(0)
    b = make_batch(seed=8)
    enc = CellEncoder(tiny_cfg())
    weight = torch.randn(*b["gene_ids"].shape, 32)
    grads = {}
    for be in ("reference", "flash"):
        enc.backend = be
        enc.zero_grad()
        hidden = enc(b["gene_ids"], b["values"], b["padding_mask"], b["value_mask"])
        assert hidden.dtype == torch.float32
        (hidden * weight).sum().backward()
        grads[be] = (hidden.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()})
    rel = lambda a, r: float((a - r).norm() / r.norm())  # noqa: E731
    assert rel(grads["flash"][0], grads["reference"][0]) < 2e-2
    for name, g in grads["reference"][1].items():
        assert rel(grads["flash"][1][name], g) < 3e-2, name
    assert rel(grads["flash"][0], grads["reference"][0]) > 0  # it really ran in bf16


@pytest.mark.parametrize("backend,builder", [("flex", "build_flex_block_mask"), ("flash", "build_varlen_layout"),
                                             ("sdpa", "build_sdpa_mask")])
def test_mask_structure_is_built_once_per_batch(monkeypatch, backend, builder):
    import celljepa_dist.model.attention as attention_mod

    calls = []
    original = getattr(attention_mod, builder)
    monkeypatch.setattr(attention_mod, builder, lambda *a, **k: calls.append(1) or original(*a, **k))
    b = make_batch(seed=9)
    enc = CellEncoder(tiny_cfg(n_layers=3, attention_backend=backend, flash_kernel="torch")).eval()
    with torch.no_grad():
        enc(b["gene_ids"], b["values"], b["padding_mask"], b["value_mask"])
    assert len(calls) == 1
