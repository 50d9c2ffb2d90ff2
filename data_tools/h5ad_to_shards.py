"""Shards from an AnnData file (evaluation / finetuning data); joinids are row indices.

    python data_tools/h5ad_to_shards.py --h5ad F --vocab V --out SHARDS [--label-key cell_type] [--layer L]
Values must be integer counts unless --allow-non-integer (e.g. log-normalised X: per-cell binning
is rank-based, so bins stay meaningful, but say so explicitly).
"""
import argparse
import sys

from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import H5adSource, H5adSourceConfig
from celljepa_dist.data.vocab import GeneVocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5ad", required=True)
    p.add_argument("--vocab", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--label-key", default=None)
    p.add_argument("--layer", default=None, help="AnnData layer with counts (default: X)")
    p.add_argument("--allow-non-integer", action="store_true", help="skip the raw-count check")
    p.add_argument("--cells-per-shard", type=int, default=ShardBuildConfig.cells_per_shard)
    p.add_argument("--block-size", type=int, default=ShardBuildConfig.block_size)
    p.add_argument("--n-bins", type=int, default=ShardBuildConfig.n_bins)
    p.add_argument("--min-gene-match", type=float, default=ShardBuildConfig.min_gene_match)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = ShardBuildConfig(out=args.out, cells_per_shard=args.cells_per_shard, block_size=args.block_size,
                           n_bins=args.n_bins, min_gene_match=args.min_gene_match)
    try:
        vocab = GeneVocab.load(args.vocab)
        source = H5adSource(H5adSourceConfig(args.h5ad, layer=args.layer, label_key=args.label_key,
                                             raw_check=not args.allow_non_integer))
        manifest = build_shards(source, vocab, cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"h5ad_to_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"shards: {args.out} ({manifest['total_cells']} cells in {len(manifest['shards'])} shards, "
          f"skipped {manifest['skipped']}, labels {manifest.get('labels')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
