"""The finetuning losses against independent references: GEPC's inner product by hand (paper
2.4.1), the supervised ECS against a direct double loop over 2.4.2's formulas."""
from __future__ import annotations

import math

import pytest
import torch

from celljepa_dist.model.cell_jepa import StudentOutput, celljepa_loss
from celljepa_dist.model.config import LossConfig
from celljepa_dist.model.heads import MVCHead
from celljepa_dist.model.losses import ecs_supcon_loss


def test_gepc_head_is_the_hand_computed_inner_product():
    """v~ = f(y)^T W e with f = sigmoid(Linear): y = (0, ln 3) -> f(y) = (1/2, 3/4); W = diag(1, 2)
    -> W f(y) = (1/2, 3/2); e = (2, 4) -> 1 + 6 = 7. Second gene y = (0, 0): (1/2, 1) . e = 5."""
    head = MVCHead(2)
    with torch.no_grad():
        head.gene2query.weight.copy_(torch.eye(2))
        head.gene2query.bias.zero_()
        head.W.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    gene_emb = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    cell_emb = torch.tensor([[2.0, 4.0], [2.0, 4.0]])
    pred = head(gene_emb, cell_emb)
    assert pred.tolist() == pytest.approx([7.0, 5.0], abs=1e-6)
    # the [B, L, d] form gives the same numbers
    assert head(gene_emb[None], cell_emb[:1]).squeeze(0).tolist() == pytest.approx([7.0, 5.0], abs=1e-6)


def test_gepc_loss_is_the_mse_over_masked_genes():
    """loss_mvc = mean over masked genes of (v~ - v)^2, beside GEP's (v^ - v)^2, weighted 1 each."""
    batch = {"target_values": torch.tensor([[0.0, 7.0, 5.0, 2.0]]),
             "value_mask": torch.tensor([[False, True, True, False]]),
             "values": torch.tensor([[0.0, -1.0, -1.0, 2.0]]), "labels": torch.tensor([0])}
    out = StudentOutput(cell_emb=torch.zeros(1, 2), jepa_pred=torch.zeros(1, 2),
                        pred_values=torch.tensor([6.0, 5.0]),  # GEP errors 1, 0
                        mvc_pred=torch.tensor([7.0, 8.0]))  # GEPC errors 0, 3
    losses = celljepa_loss(out, batch, LossConfig(objective="scgpt", w_rec=1.0, w_mvc=1.0))
    assert losses["loss_rec"].item() == pytest.approx((1 + 0) / 2)
    assert losses["loss_mvc"].item() == pytest.approx((0 + 9) / 2)
    assert losses["loss"].item() == pytest.approx(0.5 + 4.5)


def ecs_double_loop(emb: torch.Tensor, labels: list[int], tau: float) -> float:
    """Paper 2.4.2 as written: s_ij = cos(e_i, e_j)/tau; p_ij = 1/|P(i)| for c_j = c_i (j = i
    included); L_i = -sum_j p_ij log(exp(s_ij) / sum_k exp(s_ik)); L = mean_i L_i. Cells with
    label -1 (unknown) are not in the batch N."""
    rows = [e for e, c in zip(emb.tolist(), labels) if c >= 0]
    cs = [c for c in labels if c >= 0]
    n = len(rows)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for i in range(n):
        s = [cos(rows[i], rows[k]) / tau for k in range(n)]
        log_den = math.log(sum(math.exp(v) for v in s))
        positives = [j for j in range(n) if cs[j] == cs[i]]
        total += -sum((s[j] - log_den) / len(positives) for j in positives)
    return total / n


@pytest.mark.parametrize("labels", [
    [0, 1, 0, 2, 1, 0, 2, 1],        # every type twice or more
    [0, 1, 0, 2, 1, 0, 3, 1],        # type 3 has a single cell in the batch
    [0, 1, 2, 3, 4, 5, 6, 7],        # no positive pair at all: each anchor's only positive is itself
    [0, -1, 0, 1, -1, 1, 2, 2],      # unknown labels leave the batch
])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_supervised_ecs_equals_the_double_loop(labels, tau):
    torch.manual_seed(len(labels) + int(tau * 100))
    emb = torch.randn(len(labels), 5, dtype=torch.float64)
    got = ecs_supcon_loss(emb, torch.tensor(labels), temperature=tau)
    assert got.item() == pytest.approx(ecs_double_loop(emb, labels, tau), rel=1e-6)  # the loss computes in fp32


def test_supervised_ecs_through_the_objective_uses_the_config_temperature():
    torch.manual_seed(1)
    emb = torch.randn(6, 4)
    labels = [0, 0, 1, 1, 2, 0]
    batch = {"target_values": torch.zeros(6, 2), "value_mask": torch.zeros(6, 2, dtype=torch.bool),
             "values": torch.zeros(6, 2), "labels": torch.tensor(labels)}
    out = StudentOutput(cell_emb=emb, jepa_pred=emb, pred_values=torch.zeros(0), mvc_pred=torch.zeros(0))
    cfg = LossConfig(objective="scgpt", w_mvc=0.0, w_ecs=1.0, ecs_style="supcon", ecs_temperature=0.2)
    losses = celljepa_loss(out, batch, cfg)
    assert losses["loss_ecs"].item() == pytest.approx(ecs_double_loop(emb.double(), labels, 0.2), rel=1e-5)
