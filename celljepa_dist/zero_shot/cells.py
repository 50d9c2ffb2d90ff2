"""Cells as the model saw them in training: expression rows or shard cells -> binned gene tokens.

Per cell (docs/ARCHITECTURE.md "Batches", data/binning.py): the vocab-matched non-zero genes in
vocab order, each with its quantile bin computed over ALL of them; then, only if the cell has more
than `max_genes` of them, a deterministic subset (`select_genes`); then `<cls>` first and padding
(collate.py's own batch builder, with nothing masked).

Binning is per-cell and rank based, so raw counts and normalize_total + log1p of the same cells
give the same tokens (tests/test_zero_shot_embed.py checks it on real counts).

Which genes a long cell keeps depends only on that cell's genes and values, never on its row or
batch:
  random   a fixed pseudo-random priority over gene tokens (collate.gene_keys with a fixed key):
           the same gene always outranks the same other gene, so similar cells keep similar genes;
           unbiased with respect to expression, like training's uniform subsample.
  highest  the largest input values, ties broken by the smaller token id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from celljepa_dist.data.collate import collate_cells, gene_keys
from celljepa_dist.data.kernels import NEGATIVE, NOT_FINITE, OK, prepare_rows, quantile_positions
from celljepa_dist.data.shards import CellBlock

GENE_SELECTIONS = ("random", "highest")
SELECTION_KEY = np.uint32(0x2545F491)  # the fixed "cell key" of the random priority (any constant works)
MAX_NAMED = 5  # cells named in an error before "... and N more"


@dataclass
class TokenizedCells:
    """Cells in CSR form: vocab token ids ascending within each cell, their bins and input values."""

    offsets: np.ndarray  # int64 [n + 1]
    genes: np.ndarray  # int32 [nnz]
    bins: np.ndarray  # uint8 [nnz], 1..n_bins-1
    values: np.ndarray  # float32 [nnz], the input values (raw counts or normalised); orders `highest`

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_block(cls, block: CellBlock) -> "TokenizedCells":
        return cls(np.asarray(block.offsets, np.int64), block.genes, block.bins, block.counts)

    def take(self, rows: np.ndarray) -> "TokenizedCells":
        """The cells `rows`, in that order."""
        starts, n = self.offsets[rows], self.lengths[rows]
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        flat = np.arange(int(offsets[-1]), dtype=np.int64) + np.repeat(starts - offsets[:-1], n)
        return TokenizedCells(offsets, self.genes[flat], self.bins[flat], self.values[flat])


# --- expression rows ---------------------------------------------------------------------------

def expression_matrix(adata, layer: str | None, where: str):
    """adata.X, adata.layers[layer], or adata.raw.X for 'raw' (data/h5ad.py), with an error listing
    the layers when it is missing. Its columns are `data.h5ad.layer_var(adata, layer, where)`."""
    from celljepa_dist.data.h5ad import layer_matrix

    return layer_matrix(adata, layer, where)


def _row_source(matrix):
    """CSR rows can be sliced without copies; other sparse layouts are converted once (CSC row
    slicing is quadratic); dense and backed matrices are converted one chunk at a time."""
    if sp.issparse(matrix):
        csr = matrix if matrix.format == "csr" else matrix.tocsr()
        if not csr.has_canonical_format:  # repeated entries would give a cell the same token twice
            csr = csr.copy()
            csr.sum_duplicates()
        return csr
    return matrix


def row_chunks(matrix, chunk_cells: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(first row, indptr int64 from 0, column indices int64, values float32) per chunk of rows."""
    source = _row_source(matrix)
    n_rows = source.shape[0]
    for start in range(0, n_rows, chunk_cells):
        stop = min(start + chunk_cells, n_rows)
        if sp.issparse(source):
            a, b = int(source.indptr[start]), int(source.indptr[stop])
            indptr = source.indptr[start:stop + 1].astype(np.int64) - a
            indices, data = source.indices[a:b], source.data[a:b]
        else:
            chunk = source[start:stop]
            chunk = sp.csr_matrix(chunk if sp.issparse(chunk) else np.asarray(chunk))
            chunk.sum_duplicates()
            indptr, indices, data = chunk.indptr.astype(np.int64), chunk.indices, chunk.data
        yield (start, indptr, np.ascontiguousarray(indices, dtype=np.int64),
               np.ascontiguousarray(data, dtype=np.float32))


def _entry_error(where: str, obs_names: Sequence[str], gene_labels: Sequence[str], row: int, gene: int,
                 value: float, what: str) -> ValueError:
    return ValueError(f"{where}: cell {obs_names[row]!r} (row {row}), gene {gene_labels[gene]!r}: value {value!r} "
                      f"{what}; expression must be raw counts or normalised values (e.g. log1p), never scaled")


def matched_genes_per_cell(matrix, tokens: np.ndarray, obs_names: Sequence[str], gene_labels: Sequence[str],
                           where: str, chunk_cells: int = 8192) -> np.ndarray:
    """Per cell, how many of its non-zero genes are in the vocab. Refuses a negative or non-finite
    value anywhere (naming the cell and gene): such a matrix is scaled or broken, not expression."""
    counts = np.zeros(matrix.shape[0], np.int64)
    for start, indptr, indices, data in row_chunks(matrix, chunk_cells):
        bad = ~np.isfinite(data) | (data < 0)
        if bad.any():
            k = int(np.argmax(bad))
            row = start + int(np.searchsorted(indptr, k, side="right") - 1)
            what = "is not finite" if not np.isfinite(data[k]) else "is negative"
            raise _entry_error(where, obs_names, gene_labels, row, int(indices[k]), float(data[k]), what)
        matched = np.concatenate([[0], np.cumsum((tokens[indices] >= 0) & (data != 0))])
        counts[start:start + len(indptr) - 1] = matched[indptr[1:]] - matched[indptr[:-1]]
    return counts


def check_no_empty_cells(genes_per_cell: np.ndarray, cell_names: Sequence[str], where: str) -> None:
    """An empty cell would be embedded from `<cls>` alone: a meaningless row. Name them instead."""
    empty = np.flatnonzero(genes_per_cell == 0)
    if len(empty) == 0:
        return
    named = ", ".join(repr(str(cell_names[i])) for i in empty[:MAX_NAMED])
    more = f" and {len(empty) - MAX_NAMED} more" if len(empty) > MAX_NAMED else ""
    raise ValueError(f"{where}: {len(empty)} of {len(genes_per_cell)} cells have no expressed gene in the model's "
                     f"vocab: {named}{more}. Remove them (e.g. keep cells with counts in matched genes) or check "
                     f"the gene matching (--gene-key)")


def tokenize_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, tokens: np.ndarray,
                  n_bins: int) -> TokenizedCells:
    """One chunk of expression rows -> tokens, in training's compiled pass (kernels.prepare_rows):
    drop zeros and genes without a token, order by token, bin over all the cell's matched genes.
    Every row must have a matched gene (check_no_empty_cells first)."""
    offsets, tok, vals, bins, kept, _, _, code, k = prepare_rows(
        indptr, indices, data, np.ascontiguousarray(tokens, dtype=np.int64), quantile_positions(n_bins), False)
    if code != OK:  # matched_genes_per_cell names the cell and gene; this is the last line of defence
        what = {NOT_FINITE: "non-finite", NEGATIVE: "negative"}.get(code, f"code {code}")
        raise ValueError(f"tokenize_rows: a {what} value at entry {k}")
    if len(kept) != len(indptr) - 1:
        raise ValueError(f"tokenize_rows: {len(indptr) - 1 - len(kept)} rows without a matched expressed gene")
    nnz = int(offsets[-1])
    return TokenizedCells(offsets.astype(np.int64), tok[:nnz], bins[:nnz], vals[:nnz])


# --- gene selection ----------------------------------------------------------------------------

def check_gene_selection(rule: str) -> None:
    if rule not in GENE_SELECTIONS:
        raise ValueError(f"gene selection {rule!r}: must be one of {GENE_SELECTIONS}")


def gene_priority(genes: np.ndarray) -> np.ndarray:
    """The `random` rule's priority of each gene token (smaller = kept first); a bijection of the
    token, so priorities never tie."""
    return gene_keys(np.asarray(genes), np.full(len(genes), SELECTION_KEY, dtype=np.uint32))


def select_genes(cells: TokenizedCells, max_genes: int, rule: str = "random") -> TokenizedCells:
    """Keep at most `max_genes` genes per cell (bins unchanged: they were computed over all genes),
    in vocab order; a function of each cell's own genes and values only."""
    check_gene_selection(rule)
    if max_genes < 1:
        raise ValueError(f"max_genes must be >= 1, got {max_genes}")
    lengths = cells.lengths
    if (lengths <= max_genes).all():
        return cells
    row = np.repeat(np.arange(len(cells)), lengths)
    if rule == "random":
        order = np.lexsort((gene_priority(cells.genes), row))
    else:
        order = np.lexsort((cells.genes, -cells.values.astype(np.float64), row))
    # `order` keeps rows contiguous and in order, so an entry's rank in its cell is its position
    # minus the cell's start.
    rank = np.arange(len(order)) - np.repeat(cells.offsets[:-1], lengths)
    keep = np.zeros(len(order), dtype=bool)
    keep[order[rank < max_genes]] = True
    kept_lengths = np.minimum(lengths, max_genes)
    offsets = np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64)
    return TokenizedCells(offsets, cells.genes[keep], cells.bins[keep], cells.values[keep])


# --- batches ---------------------------------------------------------------------------------------

def batch_arrays(cells: TokenizedCells) -> dict[str, np.ndarray]:
    """The training batch dict (collate.py) of these cells with nothing masked: `<cls>` first,
    genes in vocab order, bins as values, padding to the longest cell."""
    width = int(cells.lengths.max()) if len(cells) else 0
    return collate_cells(cells.offsets, cells.genes, cells.bins, np.arange(len(cells), dtype=np.int64),
                         seed=0, epoch=0, max_genes=max(width, 1), mask_ratio=0.0)
