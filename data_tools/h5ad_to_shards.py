"""Shards from one or more AnnData files; joinids are the global row index (file after file).

    python data_tools/h5ad_to_shards.py --h5ad A.h5ad [B.h5ad ...] --vocab V --out SHARDS \\
        [--label-key [STEM=]KEY ...] [--allow-missing-labels] [--layer [STEM=]LAYER ...] \\
        [--allow-non-integer [STEM ...]] [--gene-id-scheme auto|ensembl|symbol] \\
        [--gene-key [STEM=]COLUMN ...] [--gene-map MAP.tsv]

Cells of file 1, then file 2, ...; each cell's dataset_id is its file's stem. --label-key KEY
applies to every file, STEM=KEY to one file (overriding), STEM= marks a file as unlabelled; a
file without its key is an error unless --allow-missing-labels (label -1, cell_type ''). Labels
share one index over all files; a missing label (NaN/None, '', 'nan') is unknown (-1), never a
class, and the summary counts such cells per file. Values must be integer counts, checked per
file, unless --allow-non-integer (bare: every file; with stems: those files), e.g. for
log-normalised X: per-cell binning is rank-based, so bins stay meaningful, but say so explicitly.
--layer raw reads adata.raw.X with its genes (adata.raw.var), where a normalised X often keeps
the counts. Gene and --layer options as for build_vocab.py (give the same ones).
"""
import argparse
import sys

from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import H5adFilesConfig, H5adFilesSource, PerFile
from celljepa_dist.data.gene_ids import REQUESTABLE_SCHEMES
from celljepa_dist.data.vocab import GeneVocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5ad", nargs="+", action="extend", required=True, metavar="FILE",
                   help="one or more (or repeated)")
    p.add_argument("--vocab", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--label-key", nargs="+", action="extend", metavar="[STEM=]KEY")
    p.add_argument("--allow-missing-labels", action="store_true")
    p.add_argument("--layer", nargs="+", action="extend", metavar="[STEM=]LAYER",
                   help="AnnData layer with counts (default: X; raw: adata.raw)")
    p.add_argument("--allow-non-integer", nargs="*", metavar="STEM",
                   help="skip the raw-count check: for every file, or for the files named")
    p.add_argument("--gene-id-scheme", choices=REQUESTABLE_SCHEMES, default="auto")
    p.add_argument("--gene-key", nargs="+", action="extend", metavar="[STEM=]COLUMN")
    p.add_argument("--gene-map", metavar="TSV")
    p.add_argument("--cells-per-shard", type=int, default=ShardBuildConfig.cells_per_shard)
    p.add_argument("--block-size", type=int, default=ShardBuildConfig.block_size)
    p.add_argument("--n-bins", type=int, default=ShardBuildConfig.n_bins)
    p.add_argument("--min-gene-match", type=float, default=ShardBuildConfig.min_gene_match)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = ShardBuildConfig(out=args.out, cells_per_shard=args.cells_per_shard, block_size=args.block_size,
                           n_bins=args.n_bins, min_gene_match=args.min_gene_match)
    try:
        non_integer = args.allow_non_integer
        source_cfg = H5adFilesConfig(
            args.h5ad, layer=PerFile.parse(args.layer, "--layer"), label_key=PerFile.parse(args.label_key, "--label-key"),
            allow_missing_labels=args.allow_missing_labels, raw_check=non_integer != [],
            non_integer_stems=tuple(non_integer or ()), gene_id_scheme=args.gene_id_scheme,
            gene_key=PerFile.parse(args.gene_key, "--gene-key"), gene_map=args.gene_map)
        vocab = GeneVocab.load(args.vocab)
        source = H5adFilesSource(source_cfg)
        manifest = build_shards(source, vocab, cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"h5ad_to_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"shards: {args.out} ({manifest['total_cells']} cells in {len(manifest['shards'])} shards, "
          f"gene-id scheme {manifest['source']['gene_id_scheme']}, skipped {manifest['skipped']}, "
          f"labels {manifest.get('labels')})")
    for line in unlabelled_lines(manifest["source"]):
        print(line)
    return 0


def unlabelled_lines(source: dict) -> list[str]:
    """One line per file with cells that carry no label (stored as unknown, -1)."""
    return [f"  {f['cells_without_label']} cells without a label in {f['label_key'] or '(no label key)'} "
            f"({f['path']}): stored as unknown (-1)"
            for f in source.get("files", []) if f.get("cells_without_label")]


if __name__ == "__main__":
    sys.exit(main())
