"""Each loss against an independent loop formulation."""
import math

import pytest
import torch

from celljepa_dist.model import (
    CellJEPA,
    LossConfig,
    ModelConfig,
    celljepa_loss,
    ecs_scgpt_loss,
    ecs_supcon_loss,
    jepa_cosine_loss,
    make_teacher,
    masked_mse,
    mse,
    teacher_embedding,
)
from celljepa_dist.model.synthetic import random_batch


def test_masked_mse_equals_loop():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 7), torch.randn(4, 7)
    mask = torch.rand(4, 7) < 0.4
    total, n = 0.0, 0
    for b in range(4):
        for i in range(7):
            if mask[b, i]:
                total += (float(pred[b, i]) - float(target[b, i])) ** 2
                n += 1
    assert masked_mse(pred, target, mask).item() == pytest.approx(total / n, rel=1e-6)
    assert mse(pred[mask], target[mask]).item() == pytest.approx(total / n, rel=1e-6)


def test_masked_mse_with_nothing_masked_is_zero_not_nan():
    pred = torch.randn(3, 5, requires_grad=True)
    loss = masked_mse(pred, torch.randn(3, 5), torch.zeros(3, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros(3, 5))
    empty = torch.zeros(0, requires_grad=True)
    assert mse(empty, torch.zeros(0)).item() == 0.0


def test_jepa_cosine_equals_loop_and_stops_teacher_gradient():
    torch.manual_seed(0)
    pred = torch.randn(5, 8, requires_grad=True)
    target = torch.randn(5, 8, requires_grad=True)
    want = 0.0
    for b in range(5):
        p, t = pred[b].tolist(), target[b].tolist()
        dot = sum(x * y for x, y in zip(p, t))
        want += 1 - dot / (math.sqrt(sum(x * x for x in p)) * math.sqrt(sum(y * y for y in t)))
    loss = jepa_cosine_loss(pred, target)
    assert loss.item() == pytest.approx(want / 5, rel=1e-5)
    loss.backward()
    assert pred.grad is not None and target.grad is None  # sg(e)
    assert jepa_cosine_loss(target.detach() * 3.0, target.detach()).item() == pytest.approx(0.0, abs=1e-6)


def supcon_loop(emb, labels, tau, include_self):
    keep = [i for i in range(len(labels)) if labels[i] >= 0]
    e = [emb[i].tolist() for i in keep]
    c = [int(labels[i]) for i in keep]
    n = len(e)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    losses = []
    for i in range(n):
        others = [k for k in range(n) if include_self or k != i]
        pos = [j for j in others if c[j] == c[i]]
        if not pos:
            continue
        denom = sum(math.exp(cos(e[i], e[k]) / tau) for k in others)
        losses.append(-sum(math.log(math.exp(cos(e[i], e[j]) / tau) / denom) for j in pos) / len(pos))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("include_self", [True, False])
def test_ecs_supcon_equals_loop(include_self):
    torch.manual_seed(0)
    emb = torch.randn(9, 6)
    labels = torch.tensor([0, 1, 0, 2, 1, -1, 0, 3, 2])  # a singleton type (3), an unknown (-1)
    got = ecs_supcon_loss(emb, labels, temperature=0.5, include_self=include_self)
    assert got.item() == pytest.approx(supcon_loop(emb, labels, 0.5, include_self), rel=1e-5)


def test_ecs_supcon_prefers_clustered_embeddings():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    mixed = clustered[[0, 2, 1, 3]]
    assert ecs_supcon_loss(clustered, labels, 0.1) < ecs_supcon_loss(mixed, labels, 0.1)


def test_ecs_scgpt_equals_loop():
    torch.manual_seed(0)
    emb = torch.randn(6, 5)
    n, total = 6, 0.0
    for i in range(n):
        for j in range(n):
            a, b = emb[i].tolist(), emb[j].tolist()
            cos = 0.0 if i == j else sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
            total += 1 - (max(cos, 0.0) - 0.3) ** 2
    assert ecs_scgpt_loss(emb, 0.3).item() == pytest.approx(total / n / n, rel=1e-6)


def tiny_model(**kw):
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_hid=32, dropout=0.0, **kw)
    return CellJEPA(cfg)


def test_celljepa_loss_combines_weighted_terms():
    torch.manual_seed(0)
    model = tiny_model(use_mvc=True)
    teacher = make_teacher(model.student)
    batch = random_batch([9, 6, 4], vocab_size=40, mask_ratio=0.5, seed=1, labels=[0, 1, 0])
    out = model.forward_student(batch)
    n_masked = int(batch["value_mask"].sum())
    assert out.pred_values.shape == (n_masked,) and out.mvc_pred.shape == (n_masked,)
    cfg = LossConfig(w_rec=2.0, w_jepa=1000.0, w_mvc=0.5, w_ecs=0.3)
    t_cls = teacher_embedding(teacher, batch)
    losses = celljepa_loss(out, batch, cfg, t_cls)
    target = batch["target_values"][batch["value_mask"]]
    want_rec = ((out.pred_values - target) ** 2).mean()
    assert losses["loss_rec"].item() == pytest.approx(want_rec.item(), rel=1e-6)
    assert losses["loss_jepa"].item() == pytest.approx(jepa_cosine_loss(out.jepa_pred, t_cls).item(), rel=1e-6)
    want = 2.0 * losses["loss_rec"] + 1000.0 * losses["loss_jepa"] + 0.5 * losses["loss_mvc"] + 0.3 * losses["loss_ecs"]
    assert losses["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.predictor.mlp[0].weight.grad.abs().sum() > 0


def test_mvc_prediction_matches_scgpt_formula():
    torch.manual_seed(0)
    model = tiny_model(use_mvc=True).eval()
    batch = random_batch([7, 5], vocab_size=40, mask_ratio=0.6, seed=2)
    out = model.forward_student(batch)
    head, gene = model.mvc_head, model.student.embed.gene
    k = 0
    for b in range(2):
        for i in range(7):
            if batch["value_mask"][b, i]:
                y = gene(batch["gene_ids"][b, i])
                want = head.W(torch.sigmoid(head.gene2query(y))) @ out.cell_emb[b]
                assert out.mvc_pred[k].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
                k += 1
    assert k == out.mvc_pred.numel()


def test_scgpt_objective_needs_no_teacher_and_has_no_jepa_term():
    model = tiny_model(use_mvc=True)
    batch = random_batch([8, 3], vocab_size=40, seed=3)
    losses = celljepa_loss(model(batch), batch, LossConfig(objective="scgpt"))  # GEP + GEPC (weight 1)
    assert "loss_jepa" not in losses
    assert losses["loss"].item() == pytest.approx(losses["loss_rec"].item() + losses["loss_mvc"].item())
    with pytest.raises(ValueError, match="teacher"):
        celljepa_loss(model(batch), batch, LossConfig(objective="celljepa"))


def test_value_head_sees_only_masked_positions():
    """Predictions at masked positions equal the head applied to the full hidden states there."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    batch = random_batch([8, 5, 6], vocab_size=40, mask_ratio=0.4, seed=4)
    out = model.forward_student(batch)
    hidden = model.student(batch["gene_ids"], batch["values"], batch["padding_mask"], batch["value_mask"])
    full = model.value_head(hidden)
    torch.testing.assert_close(out.pred_values, full[batch["value_mask"]])


def test_loss_config_validation_names_the_field():
    with pytest.raises(ValueError, match="objective"):
        LossConfig(objective="byol").validate()
    with pytest.raises(ValueError, match="ecs_temperature"):
        LossConfig(ecs_temperature=0).validate()
    with pytest.raises(ValueError, match="w_jepa"):
        LossConfig(w_jepa=-1).validate()
