"""Make a GEARS data directory (perturb_processed.h5ad) from any h5ad of raw counts with a
perturbation column, processed as GEARS processes Norman and Adamson (celljepa_dist/perturb/prepare.py).

    python data_tools/h5ad_to_gears.py --h5ad screen.h5ad --perturbation guide_target \\
        --control non-targeting --gene-name gene_symbols --out data/my_screen

Labels: a control label -> 'ctrl'; 'A' -> 'A+ctrl'; 'A+B' (or --sep) -> a combo. X (or --layer) must
hold raw counts: log-normalised input is refused with a clear error.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5ad", required=True)
    p.add_argument("--out", required=True, help="the GEARS directory to write")
    p.add_argument("--perturbation", required=True, help="obs column with the perturbation labels")
    p.add_argument("--control", action="append", default=[], help="label(s) of control cells (repeatable)")
    p.add_argument("--cell-type", default=None, help="obs column of the cell type (default: one type, --cell-type-value)")
    p.add_argument("--cell-type-value", default="cell")
    p.add_argument("--gene-name", default=None, help="var column of gene symbols (default: var_names)")
    p.add_argument("--layer", default=None, help="layer with the raw counts (default: X)")
    p.add_argument("--sep", default="+", help="separator of the genes of a combo label")
    args = p.parse_args(argv)
    import anndata as ad

    from celljepa_dist.perturb.prepare import counts_to_gears, write_gears_dir

    adata = ad.read_h5ad(args.h5ad)
    out = counts_to_gears(adata, args.perturbation, args.control or ["ctrl"], args.cell_type, args.cell_type_value,
                          args.gene_name, args.layer, args.sep, where=args.h5ad)
    path = write_gears_dir(out, args.out)
    n = out.obs["condition"].nunique() - 1
    print(f"GEARS directory: {path} ({out.n_obs} cells, {n} perturbations, {out.n_vars} genes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
