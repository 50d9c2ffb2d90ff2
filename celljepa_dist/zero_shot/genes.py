"""Match a dataset's genes to a model's vocabulary, and refuse a match too poor to mean anything.

The dataset's gene labels (var_names, or one var column) are matched with `GeneVocab.map_genes`,
passing the same labels as ids and as names: Ensembl ids match by exact then unversioned id
(ENSG00000000003.15 -> ENSG00000000003), symbols by the vocab's unambiguous feature names. So one
column of either kind works without saying which kind it is. Each vocab token goes to at most one
dataset gene (the first), so a cell never holds a token twice.

The threshold is on the fraction of the MODEL'S VOCABULARY found in the dataset: many dataset
genes the model never saw is normal (they are ignored), few vocab genes found means the model sees
little of each cell. The default (1%) only catches a wrong gene naming scheme; docs/embedding.md
says why it is not higher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from celljepa_dist.data.vocab import GeneVocab

# A wrong scheme (mouse symbols on a human vocab, barcodes or integers as var_names, the wrong var
# column) matches ~0% of the vocab; the paper's own zero-shot set (PBMC-10K, 3,346 HVGs) covers
# 5.5% of a 60,664-gene Census vocab and a 2,000-HVG set 3.3%. 1% sits between the two.
DEFAULT_MIN_VOCAB_FRACTION = 0.01


@dataclass(frozen=True)
class GeneMatch:
    """Which vocab token each dataset gene maps to (-1: not in the vocab), and the counts."""

    tokens: np.ndarray  # int64 [n_dataset_genes]
    gene_source: str  # where the labels came from: "var_names" or "var['COLUMN']"
    n_vocab_genes: int  # genes in the model's vocab (special tokens excluded)

    @property
    def n_dataset_genes(self) -> int:
        return len(self.tokens)

    @property
    def n_matched(self) -> int:
        """Matched pairs: as many dataset genes as vocab genes (the mapping is one-to-one)."""
        return int((self.tokens >= 0).sum())

    @property
    def vocab_fraction(self) -> float:
        return self.n_matched / max(self.n_vocab_genes, 1)

    @property
    def dataset_fraction(self) -> float:
        return self.n_matched / max(self.n_dataset_genes, 1)

    def describe(self) -> str:
        return (f"genes ({self.gene_source}): {self.n_matched:,} of {self.n_dataset_genes:,} dataset genes "
                f"({self.dataset_fraction:.1%}) matched {self.n_matched:,} of the model's {self.n_vocab_genes:,} "
                f"vocab genes ({self.vocab_fraction:.1%})")


def gene_labels(var: pd.DataFrame, gene_key: Optional[str], where: str) -> tuple[list[str], str]:
    """The strings to match (var_names, or the var column `gene_key`) and a name for their source."""
    if gene_key is None:
        return [str(x) for x in var.index], "var_names"
    if gene_key not in var.columns:
        raise ValueError(f"{where}: gene key {gene_key!r} is not a var column; var columns: {list(var.columns)} "
                         f"(omit --gene-key to match var_names)")
    # Missing entries (NaN) become "" so they cannot match a gene called "nan".
    column = var[gene_key]
    labels = ["" if pd.isna(x) else str(x) for x in column.tolist()]
    return labels, f"var[{gene_key!r}]"


def match_genes(vocab: GeneVocab, labels: Sequence[str], gene_source: str = "genes") -> GeneMatch:
    tokens, _ = vocab.map_genes(list(labels), list(labels))
    return GeneMatch(tokens=tokens, gene_source=gene_source, n_vocab_genes=len(vocab.feature_ids))


def check_vocab_coverage(match: GeneMatch, min_vocab_fraction: float, where: str,
                         var_columns: Sequence[str] = ()) -> None:
    """Refuse a dataset that holds less than `min_vocab_fraction` of the model's vocab genes."""
    if match.vocab_fraction >= min_vocab_fraction and match.n_matched > 0:
        return
    hint = f" (var columns: {list(var_columns)})" if len(var_columns) else " (var has no columns)"
    raise ValueError(
        f"{where}: only {match.n_matched:,} of the model's {match.n_vocab_genes:,} vocab genes "
        f"({match.vocab_fraction:.2%}) are among the dataset's {match.n_dataset_genes:,} genes "
        f"({match.gene_source}); the minimum is {min_vocab_fraction:.2%}. Wrong gene naming? Pass --gene-key "
        f"(gene_key=) naming a var column with Ensembl ids or gene symbols{hint}, or lower --min-vocab-fraction "
        f"if the dataset really holds this few of the model's genes")


def check_min_vocab_fraction(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_vocab_fraction must be in [0, 1], got {value}")


def match_dataset_genes(vocab: GeneVocab, var: pd.DataFrame, gene_key: Optional[str] = None,
                        min_vocab_fraction: float = DEFAULT_MIN_VOCAB_FRACTION, where: str = "adata") -> GeneMatch:
    """var (AnnData.var) -> GeneMatch, refusing a coverage below `min_vocab_fraction`."""
    check_min_vocab_fraction(min_vocab_fraction)
    labels, source = gene_labels(var, gene_key, where)
    match = match_genes(vocab, labels, source)
    check_vocab_coverage(match, min_vocab_fraction, where, list(var.columns))
    return match
