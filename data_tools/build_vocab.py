"""Build vocab.json from a Census-shaped store or an AnnData file (genes keyed by feature_id).

    python data_tools/build_vocab.py --census-uri DIR --out vocab.json
    python data_tools/build_vocab.py --h5ad FILE --out vocab.json
"""
import argparse
import sys

from celljepa_dist.data.census import CensusSource, CensusSourceConfig, H5adSource, H5adSourceConfig
from celljepa_dist.data.vocab import GeneVocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--census-uri")
    src.add_argument("--census-version")
    src.add_argument("--h5ad")
    p.add_argument("--organism", default="homo_sapiens")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        if args.h5ad:
            source = H5adSource(H5adSourceConfig(args.h5ad, raw_check=False))
        else:
            source = CensusSource(CensusSourceConfig(uri=args.census_uri, census_version=args.census_version,
                                                     organism=args.organism))
        with source:
            vocab = GeneVocab.from_genes(source.feature_ids, source.feature_names)
        sha = vocab.save(args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"build_vocab: error: {e}", file=sys.stderr)
        return 2
    print(f"vocab: {args.out} ({len(vocab.feature_ids)} genes + {len(vocab.special_tokens)} special tokens, sha256 {sha[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
