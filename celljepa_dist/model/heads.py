"""Output heads: GEP value head, GEPC/MVC head (scGPT), JEPA predictor (paper E.1)."""
from __future__ import annotations

import torch
import torch.nn as nn


class ValueHead(nn.Module):
    """scGPT's ExprDecoder: d -> d -> d -> 1 with LeakyReLU, applied row-wise to token outputs.

    Apply it to the masked tokens only ([M, d] in, [M] out): the loss never looks elsewhere."""

    def __init__(self, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, token_hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(token_hidden).squeeze(-1)


class MVCHead(nn.Module):
    """scGPT's MVCDecoder ("inner product"): value_g = <W sigmoid(query(gene_emb_g)), cell_emb>.

    Uses the gene *embedding* (GeneEmbedding output), not the transformer output, so the cell
    embedding alone must carry the cell's expression."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, gene_emb: torch.Tensor, cell_emb: torch.Tensor) -> torch.Tensor:
        """gene_emb [B, L, d] and cell_emb [B, d] -> [B, L]; or gene_emb [M, d] with cell_emb [M, d] -> [M]."""
        query = self.W(torch.sigmoid(self.gene2query(gene_emb)))
        if gene_emb.dim() == 3:
            return torch.bmm(query, cell_emb.unsqueeze(-1)).squeeze(-1)
        return (query * cell_emb).sum(-1)


class JEPAPredictor(nn.Module):
    """The embedding-alignment MLP p(.): Linear -> GELU -> Dropout -> Linear (paper E.1)."""

    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model)
        )

    def forward(self, cell_emb: torch.Tensor) -> torch.Tensor:
        return self.mlp(cell_emb)
