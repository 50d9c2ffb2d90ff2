"""Pure pieces of the training engine: resume resolution, step seeds, FLOP and parameter counts."""
from __future__ import annotations

import pytest
import torch

from celljepa_dist.model import CellJEPA, ModelConfig
from celljepa_dist.train.checkpoint import COMMIT_MARKER, ResumeError, committed_checkpoints, resolve_resume
from celljepa_dist.train.loop import count_nonembedding_params, flops_per_token, step_seed


def _ckpt(root, step, committed=True):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    if committed:
        (d / COMMIT_MARKER).write_text("{}")
    return d


def test_resume_picks_newest_committed_and_ignores_half_saves(tmp_path):
    root = tmp_path / "checkpoints"
    _ckpt(root, 9)
    newest = _ckpt(root, 100)
    _ckpt(root, 20)
    _ckpt(root, 200, committed=False)  # a save killed before its marker
    assert [d.name for d in committed_checkpoints(root)] == ["step_00000009", "step_00000020", "step_00000100"]
    assert resolve_resume(root, "auto") == newest
    assert resolve_resume(root, "none") is None and resolve_resume(root, "") is None
    assert resolve_resume(root, str(root / "step_00000020")) == root / "step_00000020"


def test_resume_refuses_a_silent_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    with pytest.raises(ResumeError, match="no committed checkpoint"):
        resolve_resume(root, "auto")
    half = _ckpt(root, 5, committed=False)
    with pytest.raises(ResumeError, match="no committed checkpoint"):
        resolve_resume(root, "auto")
    with pytest.raises(ResumeError, match=f"no {COMMIT_MARKER}"):
        resolve_resume(root, str(half))


def test_step_seed_is_pure_and_distinct():
    seeds = {step_seed(0, s, m, r) for s in range(50) for m in range(2) for r in range(4)}
    assert len(seeds) == 400
    assert step_seed(3, 7, 1, 2) == step_seed(3, 7, 1, 2) != step_seed(4, 7, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)


def test_nonembedding_params_and_flops():
    cfg = ModelConfig(vocab_size=500, d_model=32, n_layers=2, n_heads=4, d_hid=48, dropout=0.0)
    model = CellJEPA(cfg)
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    total = sum(p.numel() for p in model.parameters())
    assert count_nonembedding_params(model) == total - embeddings
    n, layers, d, length = 1000, 2, 32, 101
    assert flops_per_token(n, layers, d, length, with_teacher=False) == 6 * n + 3 * 4 * layers * length * d
    assert flops_per_token(n, layers, d, length, with_teacher=True) == 8 * n + 4 * 4 * layers * length * d
