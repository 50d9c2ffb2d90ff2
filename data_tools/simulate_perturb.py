"""Write a simulated Perturb-seq screen as a GEARS directory (perturb_processed.h5ad + simulation.json).

    python data_tools/simulate_perturb.py --out demo_out/perturb_gears --vocab demo_out/vocab.json
    python data_tools/simulate_perturb.py --out DIR --genes 500          # the Census simulator's genes

Genes come from a vocab.json (its first --genes genes: a model trained with that vocab can be the
perturbation run's `init`) or from the embedded Census simulator (the same ids and names its
shards carry). Effects are known by construction (celljepa_dist/perturb/simulate.py).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from celljepa_dist.perturb.simulate import (
    PerturbSimConfig,
    genes_from_census_simulator,
    genes_from_vocab,
    write_simulated_gears,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", default=None, help="take the genes from this vocab.json (default: the Census simulator's)")
    for f in fields(PerturbSimConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cfg = PerturbSimConfig(**{f.name: getattr(args, f.name) for f in fields(PerturbSimConfig)}).validate()
    ids, names = genes_from_vocab(args.vocab, cfg.genes) if args.vocab else genes_from_census_simulator(cfg.genes)
    out = write_simulated_gears(args.out, cfg, ids, names)
    print(f"simulated GEARS directory: {out} ({cfg.perturbed_genes} single and {cfg.combos} combo perturbations, "
          f"{cfg.genes} genes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
