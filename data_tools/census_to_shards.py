"""Stream cells from a Census-shaped store (local --census-uri or hosted --census-version) into shards.

    python data_tools/census_to_shards.py --census-uri DIR --vocab vocab.json --out SHARDS \
        [--obs-filter "tissue_general == 'kidney' and is_primary_data == True"] [--cells-per-shard N] \
        [--num-jobs K --job-index I] [--n-bins 51] [--tiledb-config KEY=VALUE ...]
K processes (or a SLURM array: --job-index $SLURM_ARRAY_TASK_ID) build disjoint shards; the output
is the same for any K. Re-running resumes: verified shards are skipped.
"""
import argparse
import sys

from celljepa_dist.data.allocator import tune_malloc_for_reading
from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import DEFAULT_OBS_FILTER, CensusSource, CensusSourceConfig
from celljepa_dist.data.vocab import GeneVocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--census-uri", help="local store (e.g. from simulate_census.py)")
    src.add_argument("--census-version", help="hosted Census release, e.g. 2023-05-15 (needs internet)")
    p.add_argument("--vocab", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--organism", default="homo_sapiens")
    p.add_argument("--obs-filter", default=DEFAULT_OBS_FILTER)
    p.add_argument("--cells-per-shard", type=int, default=ShardBuildConfig.cells_per_shard)
    p.add_argument("--block-size", type=int, default=ShardBuildConfig.block_size)
    p.add_argument("--n-bins", type=int, default=ShardBuildConfig.n_bins,
                   help="scGPT's n_bins: non-zero values get bins 1..n_bins-1 (default 51: the paper's B = 50)")
    p.add_argument("--num-jobs", type=int, default=1)
    p.add_argument("--job-index", type=int, default=0)
    p.add_argument("--min-gene-match", type=float, default=ShardBuildConfig.min_gene_match)
    p.add_argument("--tiledb-config", action="append", default=[], metavar="KEY=VALUE",
                   help="TileDB setting for the read, repeatable (e.g. sm.compute_concurrency_level=8)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    tiledb_config = {}
    for item in args.tiledb_config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--tiledb-config expects KEY=VALUE, got {item!r}")
        tiledb_config[key] = value
    tune_malloc_for_reading()  # before any reading thread exists
    cfg = ShardBuildConfig(out=args.out, cells_per_shard=args.cells_per_shard, block_size=args.block_size,
                           n_bins=args.n_bins, num_jobs=args.num_jobs, job_index=args.job_index,
                           min_gene_match=args.min_gene_match)
    try:
        vocab = GeneVocab.load(args.vocab)
        with CensusSource(CensusSourceConfig(uri=args.census_uri, census_version=args.census_version,
                                             organism=args.organism, obs_filter=args.obs_filter,
                                             tiledb_config=tiledb_config or None)) as source:
            manifest = build_shards(source, vocab, cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"census_to_shards: error: {e}", file=sys.stderr)
        return 2
    if manifest is None:
        print(f"job {cfg.job_index}/{cfg.num_jobs} done; manifest is written when every job has finished")
    else:
        print(f"shards: {args.out} ({manifest['total_cells']} cells in {len(manifest['shards'])} shards, "
              f"skipped {manifest['skipped']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
