"""The perturbation model (paper 2.5): the pre-trained student encoder, a perturbation-flag
embedding added to the gene and value embeddings, an MLP value head, the JEPA predictor.

    z_i = f_gene(y_i) + f_pert(p_i) + f_val(v_i)      p_i: 0 not perturbed, 1 perturbed, 2 <cls>/pad
    H = g_S(Z);  v_hat_i = r_pert(H_i);  e = H_0;  JEPA: p(e) against the frozen teacher's e

No input masking (E.3): the encoder attends over every token. The loss is the MSE of the
predicted perturbed values over every gene token of the input (`perturb_loss`), plus for
`celljepa` the JEPA cosine against a frozen teacher (a copy of the pre-trained student that sees
the true perturbed cell) and, when its weight is > 0, the ECS over the perturbed cell embeddings
(supervised-contrastive: cells of one condition are positives).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn

from celljepa_dist.model.cell_jepa import ecs_term
from celljepa_dist.model.config import LossConfig, ModelConfig
from celljepa_dist.model.encoder import CellEncoder
from celljepa_dist.model.heads import JEPAPredictor, ValueHead
from celljepa_dist.model.losses import jepa_cosine_loss, masked_mse

NOT_PERTURBED, PERTURBED, PERT_PAD = 0, 1, 2  # scGPT's pert_flags, pad_id 2
N_PERT_STATES = 3
BATCH_KEYS = ("gene_ids", "values", "target_values", "pert_flags", "padding_mask")


@dataclass
class PerturbOutput:
    pred_values: torch.Tensor  # [B, L] predicted perturbed value of every token (<cls>/pad: ignore)
    cell_emb: torch.Tensor  # [B, d] student <cls>
    jepa_pred: torch.Tensor  # [B, d] p(cell_emb)


def gene_positions(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """True at the gene tokens: not <cls> (position 0), not padding."""
    mask = ~batch["padding_mask"].clone()
    mask[:, 0] = False
    return mask


class PerturbModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.value_encoder != "continuous":
            raise ValueError("perturbation training feeds log-normalised expression as values: it needs "
                             f"model.value_encoder='continuous', the init model has {cfg.value_encoder!r}")
        self.cfg = cfg
        self.student = CellEncoder(cfg)
        self.pert_embedding = nn.Embedding(N_PERT_STATES, cfg.d_model, padding_idx=PERT_PAD)
        self.value_head = ValueHead(cfg.d_model)
        self.predictor = JEPAPredictor(cfg.d_model, cfg.predictor_hidden or cfg.d_model, cfg.dropout)

    def load_pretrained(self, pretrained: nn.Module) -> None:
        """Student, value head and JEPA predictor from a CellJEPA (from_pretrained); the flag
        embedding stays freshly initialised (it is new)."""
        for name in ("student", "value_head", "predictor"):
            getattr(self, name).load_state_dict(getattr(pretrained, name).state_dict())

    def forward(self, batch: Mapping[str, torch.Tensor]) -> PerturbOutput:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"perturbation batch is missing key(s) {missing}; it has {sorted(batch)}")
        extra = self.pert_embedding(batch["pert_flags"])
        hidden = self.student(batch["gene_ids"], batch["values"], batch["padding_mask"], None, extra=extra)
        cell_emb = hidden[:, 0]
        return PerturbOutput(self.value_head(hidden), cell_emb, self.predictor(cell_emb))


@torch.no_grad()
def perturbed_teacher_embedding(teacher: CellEncoder, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """e_pert = g_T(Z_pert)_0: the frozen teacher on the true perturbed cell (target values)."""
    hidden = teacher(batch["gene_ids"], batch["target_values"].float(), batch["padding_mask"], None)
    return hidden[:, 0].float()


def perturb_loss_terms(loss: LossConfig) -> list[str]:
    terms = ["loss", "loss_rec"]
    terms += ["loss_jepa"] if loss.objective == "celljepa" else []
    terms += ["loss_ecs"] if loss.w_ecs > 0 else []
    return terms


def perturb_loss(out: PerturbOutput, batch: Mapping[str, torch.Tensor], cfg: LossConfig,
                 teacher_cls: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """w_rec MSE over the gene tokens + w_jepa JEPA (celljepa) + w_ecs ECS (paper 2.5); fp32 scalars."""
    genes = gene_positions(batch)
    losses = {"loss_rec": masked_mse(out.pred_values.float(), batch["target_values"].float(), genes)}
    total = cfg.w_rec * losses["loss_rec"]
    if cfg.objective == "celljepa":
        if teacher_cls is None:
            raise ValueError("objective 'celljepa' needs the teacher's <cls> embedding of the perturbed cell")
        losses["loss_jepa"] = jepa_cosine_loss(out.jepa_pred, teacher_cls)
        total = total + cfg.w_jepa * losses["loss_jepa"]
    if cfg.w_ecs > 0:
        losses["loss_ecs"] = ecs_term(out.cell_emb, batch, cfg)
        total = total + cfg.w_ecs * losses["loss_ecs"]
    return {"loss": total, **losses}
