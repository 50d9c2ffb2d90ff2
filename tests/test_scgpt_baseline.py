"""The scGPT baseline as scGPT pre-trains (GEP + GEPC), and the optional VICReg regulariser."""
from __future__ import annotations

import pytest
import torch

from celljepa_dist.config import load_config
from celljepa_dist.model import CellJEPA, LossConfig, ModelConfig, celljepa_loss
from celljepa_dist.model.losses import vicreg_covariance, vicreg_variance
from celljepa_dist.model.synthetic import random_batch
from celljepa_dist.train.pretrain_task import pretrain_loss_terms as loss_terms


def test_each_objective_states_its_gepc_choice():
    assert LossConfig(objective="scgpt").gepc_weight == 1.0
    assert LossConfig(objective="celljepa").gepc_weight == 0.0
    assert LossConfig(objective="celljepa", w_mvc=0.5).gepc_weight == 0.5  # the ablation
    assert LossConfig(objective="scgpt", w_mvc=0.0).gepc_weight == 0.0  # the old masked-MSE-only baseline
    cfg = load_config(None, ["objective=scgpt", "data.shards_dir=x"])
    assert cfg.loss.gepc_weight == 1.0 and loss_terms(cfg.loss) == ["loss", "loss_rec", "loss_mvc"]
    assert loss_terms(load_config(None, ["data.shards_dir=x"]).loss) == ["loss", "loss_rec", "loss_jepa"]
    with pytest.raises(ValueError, match="w_mvc"):
        LossConfig(w_mvc=-1.0).validate()


def _cls_gradient(loss_cfg: LossConfig) -> torch.Tensor | None:
    """d loss / d (student <cls> output), or None when the loss does not use it at all."""
    torch.manual_seed(0)
    model = CellJEPA(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_hid=32, dropout=0.0,
                                 use_mvc=loss_cfg.gepc_weight > 0))
    batch = random_batch([9, 6, 7, 5], vocab_size=40, mask_ratio=0.4, seed=2)
    out = model.forward_student(batch)
    losses = celljepa_loss(out, batch, loss_cfg)
    (grad,) = torch.autograd.grad(losses["loss"], out.cell_emb, allow_unused=True)
    return grad


def test_gepc_trains_the_cls_output_and_masked_mse_alone_does_not():
    """The gap this baseline fixes: masked-value MSE never looks at the <cls> output."""
    without = _cls_gradient(LossConfig(objective="scgpt", w_mvc=0.0))
    assert without is None or torch.count_nonzero(without) == 0
    with_gepc = _cls_gradient(LossConfig(objective="scgpt"))
    assert with_gepc is not None and with_gepc.abs().sum() > 0
    assert torch.count_nonzero(with_gepc.abs().sum(-1)) == with_gepc.shape[0]  # every cell's <cls>


def test_gepc_without_its_head_is_a_clear_error():
    model = CellJEPA(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_hid=16, use_mvc=False))
    batch = random_batch([5, 4], vocab_size=40, mask_ratio=0.5, seed=0)
    with pytest.raises(ValueError, match="GEPC weight 1.0 .*scgpt.*use_mvc"):
        celljepa_loss(model.forward_student(batch), batch, LossConfig(objective="scgpt"))


def test_vicreg_terms_equal_their_definitions():
    torch.manual_seed(0)
    emb = torch.randn(12, 5) * torch.tensor([0.1, 0.5, 1.0, 2.0, 0.01])
    n, d = emb.shape
    want_var = 0.0
    for j in range(d):
        col = emb[:, j]
        var = sum((x - col.mean()) ** 2 for x in col) / (n - 1)
        want_var += max(0.0, 1.0 - float(torch.sqrt(var + 1e-4)))
    assert vicreg_variance(emb).item() == pytest.approx(want_var / d, rel=1e-5)
    mean = emb.mean(0)
    want_cov = 0.0
    for a in range(d):
        for b in range(d):
            if a != b:
                c = sum((emb[i, a] - mean[a]) * (emb[i, b] - mean[b]) for i in range(n)) / (n - 1)
                want_cov += float(c) ** 2
    assert vicreg_covariance(emb).item() == pytest.approx(want_cov / d, rel=1e-5)
    # A collapsed batch (every cell the same vector) costs the full variance penalty.
    assert vicreg_variance(torch.ones(8, 4)).item() == pytest.approx(1.0 - 1e-2, rel=1e-4)


def test_vicreg_is_off_by_default_and_weighted_when_on():
    torch.manual_seed(0)
    model = CellJEPA(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_hid=16))
    batch = random_batch([5, 4, 6], vocab_size=40, mask_ratio=0.5, seed=0)
    out = model.forward_student(batch)
    off = celljepa_loss(out, batch, LossConfig(objective="scgpt", w_mvc=0.0))
    assert "loss_var" not in off and "loss_cov" not in off
    on = celljepa_loss(out, batch, LossConfig(objective="scgpt", w_mvc=0.0, w_var=2.0, w_cov=0.5))
    want = on["loss_rec"] + 2.0 * vicreg_variance(out.cell_emb) + 0.5 * vicreg_covariance(out.cell_emb)
    assert on["loss"].item() == pytest.approx(want.item(), rel=1e-6)
