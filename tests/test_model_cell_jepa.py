"""CellJEPA end to end: a few real optimisation steps with the EMA teacher learn something."""
import pytest
import torch

from celljepa_dist.model import (
    CellJEPA,
    LossConfig,
    ModelConfig,
    celljepa_loss,
    ema_update_,
    encoder_params,
    make_teacher,
    momentum_at,
    teacher_embedding,
)
from celljepa_dist.model.synthetic import random_batch


def tiny(backend="sdpa", **kw):
    return ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_hid=32, dropout=0.0,
                       attention_backend=backend, flash_kernel="torch", **kw)


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_training_steps_reduce_the_loss_and_move_the_teacher(backend):
    torch.manual_seed(0)
    model = CellJEPA(tiny(backend))
    teacher = make_teacher(model.student)
    t_start = [p.clone() for p in encoder_params(teacher)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = random_batch([12, 9, 12, 7], vocab_size=40, mask_ratio=0.3, seed=0)
    loss_cfg = LossConfig(w_jepa=10.0)
    history = []
    for step in range(25):
        losses = celljepa_loss(model(batch), batch, loss_cfg, teacher_embedding(teacher, batch))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        ema_update_(encoder_params(teacher), encoder_params(model.student), momentum_at(step, 25, "linear", 0.9, 1.0))
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["loss_rec"] < 0.5 * history[0]["loss_rec"]
    assert history[-1]["loss"] < history[0]["loss"]
    moved = sum((a - b).abs().sum().item() for a, b in zip(encoder_params(teacher), t_start))
    assert moved > 0 and all(not p.requires_grad for p in teacher.parameters())


def test_embed_cells_is_normalised_and_ignores_masking():
    torch.manual_seed(0)
    model = CellJEPA(tiny()).eval()
    batch = random_batch([10, 6, 3], vocab_size=40, mask_ratio=0.5, seed=1)
    emb = model.embed_cells(batch)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    unmasked = dict(batch, values=batch["target_values"], value_mask=torch.zeros_like(batch["value_mask"]))
    torch.testing.assert_close(model.embed_cells(unmasked), emb)
    # The student's masked view differs from the unmasked one.
    assert not torch.allclose(model(batch).cell_emb, model.embed_cells(batch, normalize=False))
