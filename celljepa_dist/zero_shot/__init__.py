"""Zero-shot cell embeddings from a save_pretrained model (docs/embedding.md).

    from celljepa_dist.zero_shot import embed
    X_emb = embed("my_model", adata)          # [n_obs, d] float32, unit rows, input order

genes.py matches dataset genes to the vocab, cells.py turns expression rows or shard cells into
binned tokens as in training, embed.py batches them through the encoder.
"""
from __future__ import annotations

from .cells import GENE_SELECTIONS, TokenizedCells, select_genes
from .embed import (
                    ENCODERS,
                    POOLINGS,
                    EmbeddingConfig,
                    EmbeddingModel,
                    EmbeddingResult,
                    embed,
                    embed_anndata,
                    embed_shards,
                    load_embedding_model,
                    write_h5ad_atomic,
)
from .genes import DEFAULT_MIN_VOCAB_FRACTION, GeneMatch, match_dataset_genes

__all__ = [
    "GENE_SELECTIONS", "TokenizedCells", "select_genes", "ENCODERS", "POOLINGS", "EmbeddingConfig",
    "EmbeddingModel", "EmbeddingResult", "embed", "embed_anndata", "embed_shards", "load_embedding_model",
    "write_h5ad_atomic", "DEFAULT_MIN_VOCAB_FRACTION", "GeneMatch", "match_dataset_genes",
]
