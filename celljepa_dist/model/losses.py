"""Loss functions: pure (tensors in, scalar out)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error summed over masked positions / number masked (paper 2.4, scGPT).

    With nothing masked the loss is an exact 0 still attached to the graph (no 0/0 NaN)."""
    mask = mask.to(pred.dtype)
    err = (pred - target) ** 2 * mask
    return err.sum() / mask.sum().clamp(min=1.0)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """masked_mse on values already gathered at the masked positions ([M] each)."""
    if pred.numel() == 0:
        return pred.sum() * 0.0
    return ((pred.float() - target.float()) ** 2).mean()


def jepa_cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(p(e_student), sg(e_teacher)), averaged over cells (paper eq. 2.3)."""
    return (1.0 - F.cosine_similarity(pred.float(), target.detach().float(), dim=-1)).mean()


def ecs_supcon_loss(emb: torch.Tensor, labels: torch.Tensor, temperature: float, include_self: bool = True) -> torch.Tensor:
    """Cell-JEPA's supervised-contrastive ECS (paper 2.4.2).

    s_ij = cos(e_i, e_j) / tau; anchor i: -sum_j p_ij log softmax_k(s_ik), p_ij = 1/|P(i)| over
    same-type cells. As written in the paper, j and k range over the whole batch, the anchor
    included (`include_self=False` gives Khosla et al.'s SupCon, which leaves it out of both).
    Cells labelled < 0 (unknown type) are dropped."""
    keep = labels >= 0
    emb, labels = emb[keep].float(), labels[keep]
    n = emb.shape[0]
    if n == 0:
        return emb.sum() * 0.0
    normed = F.normalize(emb, dim=-1)
    sim = normed @ normed.T / temperature
    positive = labels[:, None] == labels[None, :]
    if not include_self:
        eye = torch.eye(n, dtype=torch.bool, device=emb.device)
        sim = sim.masked_fill(eye, float("-inf"))
        positive = positive & ~eye
    log_prob = torch.log_softmax(sim, dim=-1)
    n_pos = positive.sum(-1)
    has_pos = n_pos > 0  # without self, a singleton type has no positive: it is not an anchor
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(-1) / n_pos.clamp(min=1)
    if not bool(has_pos.any()):
        return emb.sum() * 0.0
    return per_anchor[has_pos].mean()


def ecs_scgpt_loss(emb: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """scGPT's label-free ECS (paper C.5, scGPT's TransformerModel):
    mean over all N x N entries of 1 - (relu(cos_ij) - beta)^2, the diagonal set to cos = 0."""
    normed = F.normalize(emb.float(), dim=-1)
    cos = normed @ normed.T
    cos = cos.masked_fill(torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device), 0.0)
    return torch.mean(1.0 - (F.relu(cos) - threshold) ** 2)


def vicreg_variance(emb: torch.Tensor, target_std: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance term (Bardes et al. 2022): mean over dimensions of relu(gamma - std_d),
    std over the batch's cells (unbiased), sqrt(var + eps) as in the paper's code."""
    emb = emb.float()
    if emb.shape[0] < 2:
        return emb.sum() * 0.0
    std = torch.sqrt(emb.var(dim=0) + eps)
    return F.relu(target_std - std).mean()


def vicreg_covariance(emb: torch.Tensor) -> torch.Tensor:
    """VICReg's covariance term: sum of squared off-diagonal covariances / d."""
    emb = emb.float()
    n, d = emb.shape
    if n < 2:
        return emb.sum() * 0.0
    centred = emb - emb.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return (off ** 2).sum() / d
