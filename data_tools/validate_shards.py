"""Check every shard against its manifest (sha256, cell counts, vocab hash, bin and gene ranges) and
the set against its build (no cells; tars the manifest does not list; fewer cells or shards than
build.json and .parts/ say the build made).

    python data_tools/validate_shards.py SHARDS [--vocab vocab.json]
Exits 1 and prints one line per fault, naming the shard.
"""
import argparse
import sys

from celljepa_dist.data.shards import read_manifest, validate_shards
from celljepa_dist.data.vocab import GeneVocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards")
    p.add_argument("--vocab", default=None)
    args = p.parse_args(argv)
    vocab = GeneVocab.load(args.vocab) if args.vocab else None
    faults = validate_shards(args.shards, vocab.sha256 if vocab else None, len(vocab) if vocab else None)
    if faults:
        for f in faults:
            print(f"validate_shards: {args.shards}: {f}", file=sys.stderr)
        return 1
    m = read_manifest(args.shards)
    print(f"ok: {args.shards}: {len(m['shards'])} shards, {m['total_cells']} cells verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
