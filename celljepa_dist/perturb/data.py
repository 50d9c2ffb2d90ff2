"""Training and evaluation batches of (control cell, perturbation flags, perturbed cell), as in
scGPT's perturbation pipeline (GEARS' data: each perturbed cell paired with a random control cell).

A cell's tokens: <cls>, then genes in data column order. Values are the *control* cell's
log-normalised expression (zeros included), targets the perturbed cell's, flags 1 on the
perturbed genes. Training cells keep `max_genes` genes chosen at random, the perturbed genes
always among them (scGPT #298 loses them); evaluation covers every gene, in chunks of
`eval_max_genes` (each chunk with the perturbed genes) when that is set.

Everything random is a pure function of (seed, epoch, cell): the order, the control partner and
the gene subset. The (rank, batch) partition: global batch g = k * world + rank holds positions
[g B, (g + 1) B) of the epoch's order, the ragged tail is dropped, so every rank yields the same
count and a resumed loader (`start_batch`) yields exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from celljepa_dist.tokens import CLS_ID, CLS_VALUE, PAD_ID, PAD_VALUE

from .config import PerturbDataConfig
from .gears_data import CTRL, GearsData, GearsDataError
from .model import NOT_PERTURBED, PERT_PAD, PERTURBED
from .split import PerturbSplit

STATE_FORMAT = "celljepa-perturb-loader/1"
EVAL_EPOCH = 2**31 - 1  # the control partners of evaluation cells: fixed across epochs


@dataclass
class PerturbCells:
    """The data as the model sees it: vocab tokens of the data's genes and the split's cells."""

    data: GearsData
    split: PerturbSplit
    gene_tokens: np.ndarray  # [G] vocab id per data column, -1 where the vocab lacks the gene
    model_cols: np.ndarray  # data columns the model sees (those with a token), ascending
    conditions: list[str]  # label index -> condition (every condition of the data, sorted)
    cell_label: np.ndarray  # [cells] index into `conditions`
    pert_cols: dict[str, np.ndarray]  # condition -> data columns of its perturbed genes
    train_rows: np.ndarray  # perturbed cells of the training conditions, 'ctrl' included
    ctrl_rows: np.ndarray

    @classmethod
    def build(cls, data: GearsData, split: PerturbSplit, vocab) -> "PerturbCells":
        tokens, _ = vocab.map_genes(list(data.gene_ids), list(data.gene_names))
        model_cols = np.flatnonzero(tokens >= 0)
        if len(model_cols) == 0:
            raise GearsDataError(f"{data.path}: no gene of the data is in the model's vocab (matched by var.index "
                                 "as Ensembl id, then by gene_name)")
        conditions = sorted(set(data.conditions))
        label_of = {c: i for i, c in enumerate(conditions)}
        pert_cols = {c: data.condition_gene_idx(c) for c in conditions}
        for c, cols in pert_cols.items():
            lost = [str(data.gene_names[k]) for k in cols if tokens[k] < 0]
            if lost:
                raise GearsDataError(f"{data.path}: condition {c!r} perturbs gene(s) {lost} that the model's vocab "
                                     "lacks: its flag would have no token to sit on")
        train = [c for c in split.train if c in label_of]
        train_rows = np.sort(np.concatenate([data.rows(c) for c in train]))
        return cls(data=data, split=split, gene_tokens=tokens, model_cols=model_cols, conditions=conditions,
                   cell_label=np.array([label_of[c] for c in data.conditions], dtype=np.int64),
                   pert_cols=pert_cols, train_rows=train_rows, ctrl_rows=data.rows(CTRL))

    def condition_of(self, row: int) -> str:
        return self.conditions[self.cell_label[row]]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & (2**63 - 1), *keys])


def control_partners(cells: PerturbCells, seed: int, epoch: int) -> np.ndarray:
    """[cells] the control row paired with each row in this epoch (pure in seed, epoch)."""
    pick = _rng(seed, epoch, 1).integers(0, len(cells.ctrl_rows), size=len(cells.cell_label))
    return cells.ctrl_rows[pick]


def select_genes(model_cols: np.ndarray, keep: np.ndarray, max_genes: int, rng: np.random.Generator) -> np.ndarray:
    """min(max_genes, all) columns of `model_cols`, ascending, every column of `keep` among them."""
    if len(model_cols) <= max_genes:
        return model_cols
    if len(keep) > max_genes:
        raise ValueError(f"{len(keep)} perturbed genes do not fit in max_genes={max_genes}")
    rest = np.setdiff1d(model_cols, keep, assume_unique=True)
    chosen = rng.choice(rest, max_genes - len(keep), replace=False)
    return np.sort(np.concatenate([keep, chosen]))


def make_batch(cells: PerturbCells, rows: np.ndarray, partners: np.ndarray, gene_cols: list[np.ndarray]) -> dict:
    """Perturbed rows, their control partners and each cell's data columns -> the batch dict (numpy):
    gene_ids, values (control), target_values (perturbed), pert_flags, value_mask (every gene
    token: all are targets), padding_mask, lengths, labels (condition index), cell_ids (row),
    gene_cols (data column per token, -1 at <cls> and padding)."""
    B, L = len(rows), 1 + max(len(c) for c in gene_cols)
    target_x = cells.data.dense_rows(rows)
    ctrl_x = cells.data.dense_rows(partners)
    out = {"gene_ids": np.full((B, L), PAD_ID, np.int64), "values": np.full((B, L), PAD_VALUE, np.float32),
           "target_values": np.full((B, L), PAD_VALUE, np.float32),
           "pert_flags": np.full((B, L), PERT_PAD, np.int64), "gene_cols": np.full((B, L), -1, np.int64)}
    out["gene_ids"][:, 0] = CLS_ID
    out["values"][:, 0] = CLS_VALUE
    out["target_values"][:, 0] = CLS_VALUE
    lengths = np.zeros(B, np.int32)
    for i, (row, cols) in enumerate(zip(rows, gene_cols)):
        n = len(cols)
        out["gene_ids"][i, 1:n + 1] = cells.gene_tokens[cols]
        out["values"][i, 1:n + 1] = ctrl_x[i, cols]
        out["target_values"][i, 1:n + 1] = target_x[i, cols]
        flags = np.where(np.isin(cols, cells.pert_cols[cells.condition_of(row)]), PERTURBED, NOT_PERTURBED)
        out["pert_flags"][i, 1:n + 1] = flags
        out["gene_cols"][i, 1:n + 1] = cols
        lengths[i] = n + 1
    out["padding_mask"] = np.arange(L)[None, :] >= lengths[:, None]
    out["value_mask"] = ~out["padding_mask"]
    out["value_mask"][:, 0] = False
    out["lengths"] = lengths
    out["labels"] = cells.cell_label[rows]
    out["cell_ids"] = np.asarray(rows, dtype=np.int64)
    return out


def to_tensors(batch: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class PairLoader:
    """One rank's training batches of one epoch, from `start_batch`; see the module docstring."""

    def __init__(self, cells: PerturbCells, cfg: PerturbDataConfig, rank: int, world_size: int, epoch: int,
                 start_batch: int = 0):
        self.cells, self.cfg, self.rank, self.world, self.epoch = cells, cfg, rank, world_size, epoch
        self.num_batches = batches_per_epoch(len(cells.train_rows), cfg.batch_size, world_size)
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch} outside 0..{self.num_batches}")
        self.start_batch = start_batch
        self.order = cells.train_rows[_rng(cfg.seed, epoch, 0).permutation(len(cells.train_rows))]
        self.partners = control_partners(cells, cfg.seed, epoch)

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        B = self.cfg.batch_size
        g = k * self.world + self.rank
        rows = self.order[g * B:(g + 1) * B]
        cols = [select_genes(self.cells.model_cols, self.cells.pert_cols[self.cells.condition_of(r)],
                             self.cfg.max_genes, _rng(self.cfg.seed, self.epoch, 2, int(r))) for r in rows]
        return to_tensors(make_batch(self.cells, rows, self.partners[rows], cols))

    def __iter__(self):
        for k in range(self.start_batch, self.num_batches):
            yield self.batch(k)

    def state_dict(self, consumed: int) -> dict:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batch": self.start_batch + consumed,
                "world_size": self.world, "rank": self.rank}

    def stats(self) -> dict[str, float]:
        dropped = len(self.cells.train_rows) - self.num_batches * self.world * self.cfg.batch_size
        return {"skipped_shards": 0, "skipped_cells": 0, "dropped_cells": dropped if self.rank == 0 else 0}


def batches_per_epoch(n_cells: int, batch_size: int, world_size: int) -> int:
    return n_cells // (batch_size * world_size)


def open_pair_loader(cells: PerturbCells, cfg: PerturbDataConfig, rank: int, world_size: int, epoch: int,
                     resume_state: dict | None) -> PairLoader:
    """The epoch's loader, from a saved position when `resume_state` (PairLoader.state_dict) is given."""
    start = 0
    if resume_state is not None:
        if resume_state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {resume_state.get('format')!r}, expected {STATE_FORMAT!r}")
        if resume_state["epoch"] != epoch or resume_state["world_size"] != world_size:
            raise ValueError(f"loader state of epoch {resume_state['epoch']} on {resume_state['world_size']} ranks "
                             f"cannot resume epoch {epoch} on {world_size}")
        start = int(resume_state["batch"])
    return PairLoader(cells, cfg, rank, world_size, epoch, start)


# --- evaluation ----------------------------------------------------------------------------------

def eval_cells(cells: PerturbCells, conditions: list[str], per_condition: int) -> np.ndarray:
    """Rows evaluated for `conditions`: all their cells, or the first `per_condition` of each."""
    rows = [cells.data.rows(c) if per_condition == 0 else cells.data.rows(c)[:per_condition] for c in conditions]
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def gene_chunks(model_cols: np.ndarray, keep: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Every model column once, in chunks of <= `chunk` (0: one chunk), the kept columns in each."""
    if chunk == 0 or len(model_cols) <= chunk:
        return [model_cols]
    if len(keep) >= chunk:
        raise ValueError(f"eval_max_genes={chunk} leaves no room beside {len(keep)} perturbed genes")
    rest = np.setdiff1d(model_cols, keep, assume_unique=True)
    step = chunk - len(keep)
    return [np.sort(np.concatenate([keep, rest[i:i + step]])) for i in range(0, len(rest), step)]


def eval_batches(cells: PerturbCells, rows: np.ndarray, cfg: PerturbDataConfig, seed: int):
    """Batches over `rows` (each cell once per gene chunk), control partners fixed across epochs."""
    partners = control_partners(cells, seed, EVAL_EPOCH)
    work = [(int(r), cols) for r in rows
            for cols in gene_chunks(cells.model_cols, cells.pert_cols[cells.condition_of(r)], cfg.eval_max_genes)]
    B = cfg.batch_size
    for i in range(0, len(work), B):
        part = work[i:i + B]
        rs = np.array([r for r, _ in part], dtype=np.int64)
        yield to_tensors(make_batch(cells, rs, partners[rs], [c for _, c in part]))
