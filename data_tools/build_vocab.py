"""Build vocab.json from a Census-shaped store or from one or more AnnData files.

    python data_tools/build_vocab.py --census-uri DIR --out vocab.json
    python data_tools/build_vocab.py --h5ad A.h5ad B.h5ad ... --out vocab.json \\
        [--gene-id-scheme auto|ensembl|symbol] [--gene-key [STEM=]COLUMN ...] [--gene-map MAP.tsv] \\
        [--layer [STEM=]raw]

With several files the vocabulary is the union of their genes in order of first appearance
(files in the order given, each in its var order). Genes are keyed in one scheme: `auto`
(default) takes the scheme every file is detected as (Ensembl ids or symbols) and refuses a mix;
`ensembl`/`symbol` converts the other files through --gene-map (TSV with the header
`feature_id<TAB>feature_name`). --layer raw takes the genes of adata.raw (adata.raw.var), which
index adata.raw.X; other layers share var with X. h5ad_to_shards needs the same gene and layer
options.
"""
import argparse
import sys

from celljepa_dist.data.census import CensusSource, CensusSourceConfig, H5adFilesConfig, PerFile, h5ad_gene_union
from celljepa_dist.data.gene_ids import REQUESTABLE_SCHEMES
from celljepa_dist.data.vocab import GeneVocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--census-uri")
    src.add_argument("--census-version")
    src.add_argument("--h5ad", nargs="+", action="extend", metavar="FILE", help="one or more (or repeated)")
    p.add_argument("--organism", default="homo_sapiens")
    p.add_argument("--gene-id-scheme", choices=REQUESTABLE_SCHEMES, default="auto")
    p.add_argument("--gene-key", nargs="+", action="extend", metavar="[STEM=]COLUMN",
                   help="var column (or var_names) with the gene ids, for all files or per file stem")
    p.add_argument("--gene-map", metavar="TSV", help="feature_id<TAB>feature_name pairs converting between schemes")
    p.add_argument("--layer", nargs="+", action="extend", metavar="[STEM=]LAYER",
                   help="the layer the shards will read; raw: the genes of adata.raw")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        if args.h5ad:
            cfg = H5adFilesConfig(args.h5ad, layer=PerFile.parse(args.layer, "--layer"),
                                  gene_id_scheme=args.gene_id_scheme,
                                  gene_key=PerFile.parse(args.gene_key, "--gene-key"), gene_map=args.gene_map)
            union = h5ad_gene_union(cfg)
            vocab = GeneVocab.from_genes(union.feature_ids, union.feature_names)
            how = [f"  {stem}: {f.how}, detected {f.detected}" for stem, f in zip(cfg.stems, union.files)]
            detail = [f"gene-id scheme: {union.scheme} (requested {args.gene_id_scheme})", *how]
        else:
            if args.gene_key or args.gene_map or args.layer or args.gene_id_scheme != "auto":
                raise ValueError("--gene-id-scheme/--gene-key/--gene-map/--layer apply to --h5ad only")
            with CensusSource(CensusSourceConfig(uri=args.census_uri, census_version=args.census_version,
                                                 organism=args.organism)) as source:
                vocab = GeneVocab.from_genes(source.feature_ids, source.feature_names)
            detail = []
        sha = vocab.save(args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"build_vocab: error: {e}", file=sys.stderr)
        return 2
    print(f"vocab: {args.out} ({len(vocab.feature_ids)} genes + {len(vocab.special_tokens)} special tokens, sha256 {sha[:12]})")
    for line in detail:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
