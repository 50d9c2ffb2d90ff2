"""Cell-JEPA (paper 2.3): student encoder + value head + JEPA predictor (+ MVC head).

The EMA teacher is *not* a submodule (see ema.make_teacher); the training engine owns it and
passes its `<cls>` embedding to `celljepa_loss`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn

from .config import LossConfig, ModelConfig
from .encoder import CellEncoder
from .heads import JEPAPredictor, MVCHead, ValueHead
from .losses import ecs_scgpt_loss, ecs_supcon_loss, jepa_cosine_loss, mse, vicreg_covariance, vicreg_variance

BATCH_KEYS = ("gene_ids", "values", "padding_mask", "value_mask", "target_values")


@dataclass
class StudentOutput:
    cell_emb: torch.Tensor  # [B, d] student <cls> output
    jepa_pred: torch.Tensor  # [B, d] p(cell_emb)
    pred_values: torch.Tensor  # [M] value-head predictions at the masked positions (batch order)
    mvc_pred: Optional[torch.Tensor]  # [M] MVC predictions at the masked positions, if the head exists


def check_batch(batch: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing key(s) {missing}; it has {sorted(batch)}")


def teacher_values(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The unmasked view Z: true values where masked, the input values (pad, <cls>) elsewhere."""
    return torch.where(batch["value_mask"], batch["target_values"], batch["values"])


@torch.no_grad()
def teacher_embedding(teacher: CellEncoder, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """e = g_T(Z)_0, plain attention over the non-pad tokens (value_mask=None)."""
    hidden = teacher(batch["gene_ids"], teacher_values(batch).float(), batch["padding_mask"], None)
    return hidden[:, 0].float()


class CellJEPA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.student = CellEncoder(cfg)
        self.value_head = ValueHead(cfg.d_model)
        self.predictor = JEPAPredictor(cfg.d_model, cfg.predictor_hidden or cfg.d_model, cfg.dropout)
        self.mvc_head = MVCHead(cfg.d_model) if cfg.use_mvc else None

    def forward_student(self, batch: Mapping[str, torch.Tensor]) -> StudentOutput:
        check_batch(batch)
        value_mask = batch["value_mask"]
        hidden = self.student(batch["gene_ids"], batch["values"], batch["padding_mask"], value_mask)
        cell_emb = hidden[:, 0]
        # Heads only where the loss looks: ~15% of the tokens.
        pred_values = self.value_head(hidden[value_mask])
        mvc_pred = None
        if self.mvc_head is not None:
            gene_emb = self.student.embed.gene(batch["gene_ids"][value_mask])
            cell_of_token = cell_emb.unsqueeze(1).expand(-1, value_mask.shape[1], -1)[value_mask]
            mvc_pred = self.mvc_head(gene_emb, cell_of_token)
        return StudentOutput(cell_emb, self.predictor(cell_emb), pred_values, mvc_pred)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> StudentOutput:
        return self.forward_student(batch)

    @torch.no_grad()
    def embed_cells(self, batch: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Zero-shot cell embeddings from the student on unmasked input (L2-normalised as scGPT)."""
        hidden = self.student(batch["gene_ids"], teacher_values(batch), batch["padding_mask"], None)
        emb = hidden[:, 0].float()
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


def celljepa_loss(out: StudentOutput, batch: Mapping[str, torch.Tensor], cfg: LossConfig,
                  teacher_cls: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Weighted objective. Keys: `loss`, `loss_rec`, `loss_jepa` (celljepa objective only),
    `loss_mvc` (GEPC) / `loss_ecs` / `loss_var` / `loss_cov` when their weight is > 0. All scalars (fp32)."""
    target = batch["target_values"][batch["value_mask"]]
    losses = {"loss_rec": mse(out.pred_values, target)}
    total = cfg.w_rec * losses["loss_rec"]
    if cfg.objective == "celljepa":
        if teacher_cls is None:
            raise ValueError("objective 'celljepa' needs the teacher's <cls> embedding (teacher_cls)")
        losses["loss_jepa"] = jepa_cosine_loss(out.jepa_pred, teacher_cls)
        total = total + cfg.w_jepa * losses["loss_jepa"]
    if cfg.gepc_weight > 0:
        if out.mvc_pred is None:
            raise ValueError(f"LossConfig: GEPC weight {cfg.gepc_weight} (objective {cfg.objective!r}) needs "
                             "ModelConfig.use_mvc=True")
        losses["loss_mvc"] = mse(out.mvc_pred, target)
        total = total + cfg.gepc_weight * losses["loss_mvc"]
    if cfg.w_var > 0:
        losses["loss_var"] = vicreg_variance(out.cell_emb, cfg.var_target)
        total = total + cfg.w_var * losses["loss_var"]
    if cfg.w_cov > 0:
        losses["loss_cov"] = vicreg_covariance(out.cell_emb)
        total = total + cfg.w_cov * losses["loss_cov"]
    if cfg.w_ecs > 0:
        losses["loss_ecs"] = ecs_term(out.cell_emb, batch, cfg)
        total = total + cfg.w_ecs * losses["loss_ecs"]
    return {"loss": total, **losses}


def ecs_term(cell_emb: torch.Tensor, batch: Mapping[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    """The ECS of `cfg.ecs_style`: the paper's supervised one (2.4.2) over batch['labels'], or
    scGPT's label-free one (C.5). Every task with an ECS term (finetuning, perturbation) uses this."""
    if cfg.ecs_style == "supcon":
        if "labels" not in batch:
            raise KeyError("LossConfig.ecs_style='supcon' needs batch['labels'] (cell-type indices)")
        return ecs_supcon_loss(cell_emb, batch["labels"], cfg.ecs_temperature)
    return ecs_scgpt_loss(cell_emb, cfg.ecs_threshold)
