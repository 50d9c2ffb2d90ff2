"""Mean predicted cell per held-out perturbation, from a PerturbModel, on one or several ranks.

GEARS scores the mean of the predictions for a perturbation's cells. Each rank forwards every
world-th evaluation batch (ranks with fewer batches repeat their last one without counting it,
so ZeRO-3's collective forwards line up); the sums are all-reduced. Genes the model's vocab lacks
cannot be predicted: they get the mean control cell (no change).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .data import PerturbCells, eval_batches, eval_cells

FLOAT_KEYS = ("values", "target_values")


def _to_device(batch: dict, device, float_dtype) -> dict:
    return {k: (v.to(device).to(float_dtype) if k in FLOAT_KEYS else v.to(device)) for k, v in batch.items()}


@torch.no_grad()
def predict_means(module, cells: PerturbCells, conditions: list[str], cfg, seed: int, device="cpu",
                  float_dtype=torch.float32, rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
    """condition -> mean predicted cell [G] (float64), identical on every rank."""
    rows = eval_cells(cells, conditions, cfg.eval_cells_per_perturbation)
    batches = list(eval_batches(cells, rows, cfg, seed))
    index = {c: i for i, c in enumerate(conditions)}
    G = cells.data.n_genes
    sums = torch.zeros(len(conditions), G, dtype=torch.float64)
    counts = torch.zeros(len(conditions), dtype=torch.float64)
    mine = batches[rank::world_size]
    n_rounds = -(-len(batches) // world_size)
    was_training = module.training
    module.eval()
    try:
        for i in range(n_rounds):
            if not mine:
                break  # no batch at all on this rank: nothing to line up (only with more ranks than batches)
            batch = mine[min(i, len(mine) - 1)]
            out = module(_to_device(batch, device, float_dtype))
            if i >= len(mine):
                continue  # a repeat that only keeps collective forwards in step
            pred = out.pred_values.float().cpu().double()
            cols = batch["gene_cols"]
            cond_idx = torch.tensor([index[cells.condition_of(int(r))] for r in batch["cell_ids"]])
            genes = cols >= 0
            b_idx = torch.arange(len(cond_idx))[:, None].expand_as(cols)[genes]
            sums.index_put_((cond_idx[b_idx], cols[genes]), pred[genes], accumulate=True)
    finally:
        module.train(was_training)
    for r in rows:
        if rank == 0:  # count each evaluated cell once over the ranks
            counts[index[cells.condition_of(int(r))]] += 1
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    means = (sums / counts.clamp(min=1)[:, None]).numpy()
    unseen = np.setdiff1d(np.arange(G), cells.model_cols)
    if len(unseen):
        means[:, unseen] = cells.data.control_mean()[unseen]
    return {c: means[i] for c, i in index.items()}
