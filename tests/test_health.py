"""Health metrics (celljepa_dist/health.py) against direct numpy definitions and hand-computed
cases, the collapse thresholds, and the probe's tokens and forwards (train/health_probe.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from celljepa_dist.health import (
    HealthThresholds,
    collapse_warnings,
    effective_rank,
    health_metrics,
    jepa_prediction_cosine,
    mean_dim_std,
    mean_pairwise_cosine,
    threshold_values,
    top_pc_variance_fraction,
)


def naive_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + eps
    return math.exp(-sum(pk * math.log(pk) for pk in p))


def naive_mean_cos(x: np.ndarray) -> float:
    n = len(x)
    cos = [float(x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])) for i in range(n) for j in range(n) if i != j]
    return sum(cos) / len(cos)


def naive_top3(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    eig = np.sort(np.linalg.eigvalsh(np.cov(u.T, bias=True)))[::-1]
    return float(eig[:3].sum() / eig.sum())


def test_identical_vectors_are_rank_one_cosine_one():
    x = np.tile(np.random.default_rng(0).normal(size=(1, 64)), (100, 1))
    m = health_metrics(x)
    assert m.rankme == pytest.approx(1.0, abs=1e-3)
    assert m.mean_cos == pytest.approx(1.0, abs=1e-12)
    assert m.dim_std == pytest.approx(0.0, abs=1e-12)
    assert m.top3_var == 1.0  # no variance at all: all of it (none) counts as in the top PCs
    assert len(collapse_warnings(m, HealthThresholds())) == 4


def test_orthonormal_vectors_are_full_rank_cosine_zero():
    d = 32
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(d, d)))
    m = health_metrics(q)  # rows orthonormal
    assert m.rankme == pytest.approx(d, rel=1e-5)
    assert m.mean_cos == pytest.approx(0.0, abs=1e-12)
    assert m.top3_var == pytest.approx(naive_top3(q), rel=1e-9)
    assert collapse_warnings(m, HealthThresholds()) == []


def test_scaled_basis_rank_matches_entropy_by_hand():
    # singular values 3, 1 -> p = 3/4, 1/4: rank = exp(H) = 4 / 3^(3/4)
    x = np.array([[3.0, 0.0], [0.0, 1.0]])
    assert effective_rank(x, eps=0.0) == pytest.approx(4 / 3 ** 0.75, rel=1e-12)


@pytest.mark.parametrize("shape", [(50, 8), (7, 40), (64, 64)])
def test_metrics_match_naive_definitions_on_random_matrices(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape) + rng.normal(size=(1, shape[1]))  # a shared offset, as <cls> rows have
    assert effective_rank(x) == pytest.approx(naive_rankme(x), rel=1e-10)
    assert mean_pairwise_cosine(x) == pytest.approx(naive_mean_cos(x), rel=1e-10, abs=1e-12)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert mean_dim_std(x) == pytest.approx(np.mean(np.std(u, axis=0)), rel=1e-12)
    assert top_pc_variance_fraction(x) == pytest.approx(naive_top3(x), rel=1e-9)


def test_torch_bf16_input_gives_the_float_metrics():
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert health_metrics(x) == health_metrics(x.float().numpy())


def test_jepa_prediction_cosine():
    t = np.random.default_rng(2).normal(size=(10, 6))
    assert jepa_prediction_cosine(3 * t, t) == pytest.approx(1.0)
    assert jepa_prediction_cosine(-t, t) == pytest.approx(-1.0)
    p = np.random.default_rng(3).normal(size=(10, 6))
    by_hand = np.mean([p[i] @ t[i] / np.linalg.norm(p[i]) / np.linalg.norm(t[i]) for i in range(10)])
    assert jepa_prediction_cosine(p, t) == pytest.approx(by_hand, rel=1e-12)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"\[n, d\] matrix.*\(5,\)"):
        health_metrics(np.ones(5))
    with pytest.raises(ValueError, match="at least 2 cells"):
        health_metrics(np.ones((1, 4)))
    x = np.ones((4, 3))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"not finite \(rows \[2\]"):
        health_metrics(x)


def test_each_threshold_fires_alone_and_names_metric_value_threshold():
    base = dict(n_cells=256, dim=64, rankme=40.0, mean_cos=0.2, dim_std=0.1, top3_var=0.3)
    from celljepa_dist.health import HealthMetrics

    t = HealthThresholds(min_rankme_fraction=0.05, max_mean_cos=0.9, min_dim_std_ratio=0.3, max_top3_var=0.9)
    assert collapse_warnings(HealthMetrics(**base), t) == []
    limits = threshold_values(t, 256, 64)
    assert limits["rankme"] == ("min", pytest.approx(3.2)) and limits["dim_std"] == ("min", pytest.approx(0.0375))
    cases = {"rankme": 3.0, "mean_cos": 0.95, "dim_std": 0.03, "top3_var": 0.95}
    for name, bad in cases.items():
        lines = collapse_warnings(HealthMetrics(**{**base, name: bad}), t, "student <cls>")
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"student <cls>: {name} = {bad:.4g}")
        assert f"{limits[name][1]:.4g}" in lines[0]


def test_thresholds_validate_without_mutating():
    t = HealthThresholds(max_mean_cos=1.5)
    with pytest.raises(ValueError, match="tracking.health_thresholds.max_mean_cos"):
        t.validate()
    assert t.max_mean_cos == 1.5


def test_config_section_round_trips(tmp_path):
    from celljepa_dist.config import ConfigError, flatten, load_config, save_config

    cfg = load_config(None, ["data.shards_dir=x", "tracking.probe_shards=/p", "tracking.health_every=7",
                             "tracking.health_thresholds.max_mean_cos=0.8"])
    assert cfg.tracking.health_enabled and cfg.tracking.health_thresholds.max_mean_cos == 0.8
    assert flatten(cfg)["tracking.health_thresholds.max_mean_cos"] == 0.8
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").tracking == cfg.tracking
    assert not load_config(None, ["data.shards_dir=x"]).tracking.health_enabled  # no probe: off
    assert not load_config(None, ["data.shards_dir=x", "tracking.probe_shards=/p",
                                  "tracking.health_every=0"]).tracking.health_enabled
    with pytest.raises(ConfigError, match="tracking.probe_cells"):
        load_config(None, ["data.shards_dir=x", "tracking.probe_cells=1"])
    with pytest.raises(ConfigError, match="health_thresholds.*nope"):
        load_config(None, ["data.shards_dir=x", "tracking.health_thresholds.nope=1"])


# --- the probe ------------------------------------------------------------------------------------

def test_probe_cells_are_the_first_cells_and_checked(tiny_shards, tmp_path):
    import json
    import shutil

    from celljepa_dist.data.shards import read_manifest, read_shard
    from celljepa_dist.data.vocab import GeneVocab
    from celljepa_dist.train.health_probe import load_probe_cells

    shards, vocab_path = tiny_shards
    vocab = GeneVocab.load(vocab_path)
    first = read_manifest(shards)["shards"][0]
    n_first = first["cells"]
    cells = load_probe_cells(shards, n_first + 5, vocab.sha256, vocab_path, 51)  # spans two shards
    direct = read_shard(shards / first["name"])
    assert len(cells) == n_first + 5
    np.testing.assert_array_equal(cells.joinids[:n_first], direct.joinids)
    with pytest.raises(ValueError, match=rf"built with vocab sha256 {read_manifest(shards)['vocab_sha256']}.*"
                                         rf"{vocab_path} has {'0' * 64}"):
        load_probe_cells(shards, 10, "0" * 64, vocab_path, 51)
    with pytest.raises(ValueError, match="model.n_bins=11"):
        load_probe_cells(shards, 10, vocab.sha256, vocab_path, 11)
    with pytest.raises(ValueError, match="fewer than tracking.probe_cells=100000"):
        load_probe_cells(shards, 100000, vocab.sha256, vocab_path, 51)
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    with open(broken / first["name"], "r+b") as f:
        f.seek(2000)
        f.write(b"\xff\xfe")
    with pytest.raises(ValueError, match=rf"{first['name']} does not match its sha256"):
        load_probe_cells(broken, 10, vocab.sha256, vocab_path, 51)
    assert json.loads((broken / "manifest.json").read_text())  # the manifest itself untouched


def test_probe_views_keep_the_same_genes_and_forwards_match_the_model(tiny_shards):
    from celljepa_dist.data.vocab import GeneVocab
    from celljepa_dist.model import CellJEPA, teacher_embedding
    from celljepa_dist.model.cell_jepa import teacher_values
    from celljepa_dist.model.config import ModelConfig
    from celljepa_dist.model.encoder import CellEncoder
    from celljepa_dist.train.health_probe import health_record, load_probe_cells, probe_embeddings, tokenise_probe
    from celljepa_dist.train.teacher import Teacher

    shards, vocab_path = tiny_shards
    vocab = GeneVocab.load(vocab_path)
    cells = load_probe_cells(shards, 40, vocab.sha256, vocab_path, 51)
    chunks = tokenise_probe(cells, max_genes=64, mask_ratio=0.3, chunk_cells=16)
    assert [len(c.unmasked["cell_ids"]) for c in chunks] == [16, 16, 8]
    for c in chunks:  # the masked view hides values of the same kept genes: the target is training's
        assert c.masked["value_mask"].any() and not c.unmasked["value_mask"].any()
        torch.testing.assert_close(teacher_values(c.masked), c.unmasked["values"], rtol=0, atol=0)
    again = tokenise_probe(cells, max_genes=64, mask_ratio=0.3, chunk_cells=16)
    assert all(torch.equal(a.masked["values"], b.masked["values"]) for a, b in zip(chunks, again))

    cfg = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=2, n_heads=4, d_hid=32, dropout=0.3)
    torch.manual_seed(0)
    model = CellJEPA(cfg)
    teacher = Teacher(model.student, zero_stage=0, build_like=lambda: CellEncoder(cfg))  # the loop's wrapper: an fp32 copy in eval mode
    with torch.no_grad():  # make it differ from the student, as an EMA teacher does
        for p in teacher.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    emb = probe_embeddings(model, teacher, chunks, "cpu", torch.float32)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():  # the same forwards written out on the whole probe in one batch
        whole = tokenise_probe(cells, max_genes=64, mask_ratio=0.3, chunk_cells=40)[0]
        ref_student = model.embed_cells(whole.unmasked, normalize=False)
        ref_teacher = teacher_embedding(teacher, whole.unmasked)
        ref_pred = model.forward_student(whole.masked).jepa_pred
    torch.testing.assert_close(torch.from_numpy(emb["student"]), ref_student, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(emb["teacher"]), ref_teacher, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(emb["jepa_pred"]), ref_pred, rtol=1e-4, atol=1e-5)
    flat, per = health_record(emb)
    assert set(flat) == {f"health/{e}/{m}" for e in ("student", "teacher")
                         for m in ("rankme", "mean_cos", "dim_std", "top3_var")} | {"health/jepa_pred_cos"}
    assert flat["health/student/rankme"] == pytest.approx(naive_rankme(ref_student.double().numpy()), rel=1e-4)
    no_teacher = probe_embeddings(model, None, chunks, "cpu", torch.float32)
    assert set(no_teacher) == {"student"}


@pytest.mark.parametrize("step,expected", [(5, True), (6, True), (7, False), (9, True), (10, True), (3, False)])
def test_health_due_every_n_at_commits_and_at_the_end(step, expected):
    from celljepa_dist.train.health_probe import health_due

    assert health_due(step, health_every=5, checkpoint_every=3, total_steps=10) is (expected or step % 3 == 0)
    assert health_due(step, health_every=0, checkpoint_every=3, total_steps=10) is False
