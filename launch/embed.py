"""Zero-shot cell embeddings from a save_pretrained model directory (docs/embedding.md).

    python launch/embed.py --model DIR --h5ad IN.h5ad --out OUT.h5ad      # OUT = IN + obsm[key]
    python launch/embed.py --model DIR --shards SHARDS --out OUT.h5ad     # one row per shard cell
Rows of obsm[key] are L2-normalised; X may be raw counts or normalised (binning is per-cell and
rank based). The output is written to a temp file and renamed.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

TOOL = "embed"


def parse_args(argv=None) -> argparse.Namespace:
    from celljepa_dist.zero_shot.cells import GENE_SELECTIONS
    from celljepa_dist.zero_shot.embed import ENCODERS, POOLINGS
    from celljepa_dist.zero_shot.genes import DEFAULT_MIN_VOCAB_FRACTION

    p = argparse.ArgumentParser(prog="embed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="save_pretrained directory (config.json, weights, vocab.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--h5ad", help="AnnData file to embed (all its cells, in order)")
    src.add_argument("--shards", help="shard directory (manifest.json) built with the model's vocab")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--encoder", choices=ENCODERS, default=None, help="default: teacher if saved, else student")
    p.add_argument("--key", default="X_celljepa", help="obsm key of the embeddings (default X_celljepa)")
    p.add_argument("--gene-key", default=None, help="var column with Ensembl ids or symbols (default: var_names)")
    p.add_argument("--layer", default=None, help="AnnData layer to use instead of X (raw: adata.raw)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--max-genes", type=int, default=None, help="genes per cell (default: the model's training value)")
    p.add_argument("--gene-selection", choices=GENE_SELECTIONS, default="random",
                   help="which genes a cell with more than --max-genes keeps (default random: a fixed priority)")
    p.add_argument("--min-vocab-fraction", type=float, default=DEFAULT_MIN_VOCAB_FRACTION,
                   help=f"least fraction of the model's vocab genes the dataset must hold (default {DEFAULT_MIN_VOCAB_FRACTION})")
    p.add_argument("--pooling", choices=POOLINGS, default="cls", help="<cls> output or mean of gene tokens")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.shards and (args.gene_key or args.layer):
        p.error("--gene-key and --layer apply to --h5ad only (shards hold vocab tokens already)")
    return args


def run(args: argparse.Namespace) -> str:
    import anndata

    from celljepa_dist.data.h5ad import read_h5ad
    from celljepa_dist.zero_shot.embed import EmbeddingConfig, embed_anndata, embed_shards, write_h5ad_atomic

    cfg = EmbeddingConfig(encoder=args.encoder, batch_size=args.batch_size, device=args.device,
                          max_genes=args.max_genes, gene_selection=args.gene_selection, pooling=args.pooling,
                          gene_key=args.gene_key, layer=args.layer, min_vocab_fraction=args.min_vocab_fraction,
                          progress=not args.no_progress).validate()
    if args.h5ad:
        adata = read_h5ad(args.h5ad)  # errors name the file: missing, a directory, truncated, not HDF5
        result = embed_anndata(args.model, adata, cfg, where=args.h5ad)
    else:
        result, obs = embed_shards(args.model, args.shards, cfg)
        adata = anndata.AnnData(obs=obs)
    adata.obsm[args.key] = result.embeddings
    adata.uns.setdefault("celljepa_embeddings", {})[args.key] = {
        "model": os.path.abspath(args.model), "encoder": result.encoder, "pooling": result.pooling,
        "max_genes": result.max_genes, "gene_selection": result.gene_selection}
    write_h5ad_atomic(adata, args.out)
    return f"{result.describe()}\nwrote {args.out}: {adata.n_obs:,} cells, obsm[{args.key!r}] {result.embeddings.shape}"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"{TOOL}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
