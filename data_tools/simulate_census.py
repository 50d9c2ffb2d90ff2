"""Write a local TileDB-SOMA store shaped like the CELLxGENE Census (the embedded default source).

    python data_tools/simulate_census.py --out DIR --cells N --seed S [--genes G]
"""
import argparse
import sys

from celljepa_dist.data.simulate import SimulationConfig, write_store


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to create (must not exist, or hold the same simulation)")
    p.add_argument("--cells", type=int, default=SimulationConfig.cells)
    p.add_argument("--genes", type=int, default=SimulationConfig.genes)
    p.add_argument("--seed", type=int, default=SimulationConfig.seed)
    p.add_argument("--duplicate-fraction", type=float, default=SimulationConfig.duplicate_fraction)
    args = p.parse_args(argv)
    cfg = SimulationConfig(cells=args.cells, genes=args.genes, seed=args.seed, duplicate_fraction=args.duplicate_fraction)
    try:
        out = write_store(args.out, cfg)
    except ValueError as e:
        print(f"simulate_census: error: {e}", file=sys.stderr)
        return 2
    print(f"simulated store: {out} ({cfg.cells} cells x {cfg.genes} genes, seed {cfg.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
