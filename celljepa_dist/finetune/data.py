"""A labelled h5ad -> training batches (with labels) and validation batches (without), as
pre-training's loader makes them.

Cells are tokenised once, exactly as the embedding CLI does (zero_shot/cells.py: the h5ad genes
mapped to the init's vocab, per-cell quantile bins over all matched genes), and kept in memory:
finetuning sets are small (PBMC 10k: ~10^7 tokens). Each epoch then follows pre-training's rules
(data/order.py, data/collate.py):

  - the training cells' order is a permutation of (seed, epoch); only whole rounds of
    world_size x batch_size cells are used, rank r takes the r-th contiguous span;
  - a cell's kept and masked genes are a pure function of (seed, epoch, h5ad row, its genes);
  - the position (epoch, batches done) is the resume state, so a killed run resumes exactly.

Labels are the training cells' only: a validation cell never enters a training batch, and
validation batches carry label -1 (unknown) throughout, so no validation label can reach ECS.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from celljepa_dist.data import order as O
from celljepa_dist.data.collate import collate_cells, to_tensors
from celljepa_dist.zero_shot.cells import (
    TokenizedCells,
    check_no_empty_cells,
    expression_matrix,
    matched_genes_per_cell,
    row_chunks,
    tokenize_rows,
)
from celljepa_dist.zero_shot.genes import GeneMatch, gene_labels, match_dataset_genes

STATE_FORMAT = "celljepa-finetune-loader-state/1"
UNKNOWN = -1


@dataclass
class LabelledCells:
    """Every cell of the h5ad, tokenised, in row order, with its label code (-1 unknown)."""

    cells: TokenizedCells
    codes: np.ndarray  # int64 [n]
    names: list[str]  # label code -> name (sorted)
    labels: list[str]  # per cell: its label, "" when unknown
    obs_names: list[str]
    genes: GeneMatch

    def __len__(self) -> int:
        return len(self.cells)


def label_codes(column: pd.Series) -> tuple[np.ndarray, list[str], list[str]]:
    """An obs column -> (codes, sorted names, per-cell strings). Missing or empty values: unknown."""
    values = ["" if pd.isna(v) else str(v) for v in column.tolist()]
    names = sorted({v for v in values if v != ""})
    index = {name: i for i, name in enumerate(names)}
    codes = np.array([index.get(v, UNKNOWN) for v in values], dtype=np.int64)
    return codes, names, values


def check_label_column(obs: pd.DataFrame, label_key: str, where: str) -> None:
    if label_key not in obs.columns:
        raise ValueError(f"{where}: label key {label_key!r} is not an obs column; obs columns: {list(obs.columns)} "
                         "(set data.label_key)")


def read_labelled(adata, vocab, n_bins: int, label_key: str, gene_key: str | None = None, layer: str | None = None,
                  min_vocab_fraction: float = 0.05, where: str = "adata") -> LabelledCells:
    """Labels checked first (cheap), then genes matched to `vocab` and every cell tokenised."""
    check_label_column(adata.obs, label_key, where)
    codes, names, values = label_codes(adata.obs[label_key])
    if not names:
        raise ValueError(f"{where}: obs[{label_key!r}] holds no label (every value is missing or empty)")
    match = match_dataset_genes(vocab, adata.var, gene_key, min_vocab_fraction, where)
    gene_names, _ = gene_labels(adata.var, gene_key, where)
    matrix = expression_matrix(adata, layer, where)
    obs_names = [str(x) for x in adata.obs_names]
    per_cell = matched_genes_per_cell(matrix, match.tokens, obs_names, gene_names, where)
    check_no_empty_cells(per_cell, obs_names, where)
    chunks = [tokenize_rows(indptr, indices, data, match.tokens, n_bins)
              for _, indptr, indices, data in row_chunks(matrix, 4096)]
    return LabelledCells(concat_cells(chunks), codes, names, values, obs_names, match)


def concat_cells(chunks: Sequence[TokenizedCells]) -> TokenizedCells:
    if not chunks:
        return TokenizedCells(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.float32))
    lengths = np.concatenate([c.lengths for c in chunks])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCells(offsets, np.concatenate([c.genes for c in chunks]), np.concatenate([c.bins for c in chunks]),
                          np.concatenate([c.values for c in chunks]))


def data_fingerprint(cells: TokenizedCells, rows: np.ndarray, codes: np.ndarray) -> str:
    """Identifies the training cells (their tokens, rows and labels): a resume state is never
    applied to other data."""
    h = hashlib.sha256()
    sub = cells.take(np.asarray(rows, np.int64))
    for a in (np.asarray(rows, np.int64), np.asarray(codes, np.int64), sub.offsets, sub.genes, sub.bins):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Masking:
    batch_size: int
    max_genes: int
    mask_ratio: float
    seed: int
    known_first: bool = False


def make_batch(cells: TokenizedCells, rows: np.ndarray, labels: np.ndarray, m: Masking, epoch: int) -> dict[str, torch.Tensor]:
    """The batch dict (docs/ARCHITECTURE.md) of h5ad rows `rows`; masks keyed by (seed, epoch, row)."""
    sub = cells.take(rows)
    arrays = collate_cells(sub.offsets, sub.genes, sub.bins, np.asarray(rows, np.int64), np.asarray(labels, np.int64),
                           seed=m.seed, epoch=epoch, max_genes=m.max_genes, mask_ratio=m.mask_ratio,
                           known_first=m.known_first)
    return to_tensors(arrays)


class TrainLoader:
    """One rank's training batches of one epoch (from `start_batch`); see the module docstring."""

    def __init__(self, cells: TokenizedCells, rows: np.ndarray, codes: np.ndarray, masking: Masking, epoch: int,
                 rank: int, world_size: int, fingerprint: str, start_batch: int = 0):
        self.cells, self.rows, self.codes, self.m = cells, np.asarray(rows, np.int64), np.asarray(codes, np.int64), masking
        self.epoch, self.fingerprint = epoch, fingerprint
        self.plan = O.rank_plan(len(self.rows), masking.batch_size, world_size, rank)
        if self.plan.num_batches == 0:
            raise ValueError(f"{len(self.rows)} training cells cannot fill one batch of {masking.batch_size} on each "
                             f"of {world_size} ranks (lower data.batch_size)")
        if not 0 <= start_batch <= self.plan.num_batches:
            raise ValueError(f"resume state batches_done={start_batch} is not in [0, {self.plan.num_batches}]")
        self.start_batch = start_batch
        self.order = O.cell_permutation(len(self.rows), masking.seed, epoch, 0)

    def __len__(self) -> int:
        return self.plan.num_batches - self.start_batch

    @property
    def epoch_batches(self) -> int:
        return self.plan.num_batches

    def batch_rows(self, b: int) -> np.ndarray:
        """Indices into `rows` of rank batch b."""
        return self.order[O.batch_positions(self.plan, b)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(self.start_batch, self.plan.num_batches):
            pick = self.batch_rows(b)
            yield make_batch(self.cells, self.rows[pick], self.codes[pick], self.m, self.epoch)

    def state_dict(self, batches_consumed: int) -> dict:
        if not 0 <= batches_consumed <= len(self):
            raise ValueError(f"batches_consumed {batches_consumed} is not in [0, {len(self)}]")
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batches_done": self.start_batch + batches_consumed,
                "seed": self.m.seed, "world_size": self.plan.world_size, "rank": self.plan.rank,
                "batch_size": self.plan.batch_size, "total_cells": self.plan.total_cells,
                "data_fingerprint": self.fingerprint}

    def stats(self) -> dict:
        """The shard loader's counters (none of them apply in memory) and the cells left out."""
        return {"skipped_shards": 0, "skipped_cells": 0, "rank_cells": self.plan.span_stop - self.plan.span_start,
                "dropped_cells": self.plan.dropped_cells}


def resume_position(state: dict, expected: dict) -> int:
    """batches_done of a saved loader state, after checking it belongs to this run and rank."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"resume state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    for key, want in expected.items():
        if state.get(key) != want:
            hint = " (resume with the same world size)" if key == "world_size" else ""
            raise ValueError(f"finetuning resume state {key}={state.get(key)!r} does not match this run's {want!r}{hint}")
    return int(state["batches_done"])


def open_train_loader(cells: TokenizedCells, rows: np.ndarray, codes: np.ndarray, masking: Masking, epoch: int,
                      rank: int, world_size: int, fingerprint: str, resume_state: dict | None = None) -> TrainLoader:
    start = 0
    if resume_state is not None:
        start = resume_position(resume_state, {"epoch": epoch, "seed": masking.seed, "world_size": world_size,
                                               "rank": rank, "batch_size": masking.batch_size,
                                               "total_cells": len(rows), "data_fingerprint": fingerprint})
    return TrainLoader(cells, rows, codes, masking, epoch, rank, world_size, fingerprint, start)


def validation_batches(rows: np.ndarray, batch_size: int, rank: int, world_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rank `rank`'s validation batches as (h5ad rows, real) pairs, the same number and sizes on
    every rank (forwards are collective under ZeRO-3): rows strided over ranks in row order; a
    rank with fewer cells repeats its first ones, marked real=False so they count for nothing."""
    rows = np.asarray(rows, np.int64)
    if len(rows) < world_size:
        raise ValueError(f"{len(rows)} validation cells for {world_size} ranks: every rank needs one")
    mine = rows[rank::world_size]
    per_rank = -(-len(rows) // world_size)
    padded = np.concatenate([mine, mine[:per_rank - len(mine)]])
    real = np.arange(per_rank) < len(mine)
    return [(padded[a:a + batch_size], real[a:a + batch_size]) for a in range(0, per_rank, batch_size)]


def unknown_labels(n: int) -> np.ndarray:
    return np.full(n, UNKNOWN, np.int64)


def read_h5ad(path: str | Path, where: str | None = None):
    """anndata.read_h5ad with an error naming the file."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.h5ad: {path} not found")
    try:
        return anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{where or path}: cannot read h5ad: {e}") from e
