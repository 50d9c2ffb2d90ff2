"""Compare the runs of one MLflow experiment: differing parameters, final losses, evaluation metrics.

    python launch/compare_runs.py --experiment celljepa-demo --out demo_out/compare
    python launch/compare_runs.py --tracking-uri sqlite:///runs/mlflow.db --experiment E --runs ID1 ID2 --out DIR
Writes DIR/comparison.md and DIR/loss_curves.png, prints the markdown and the URL of the same
comparison in the MLflow UI (start one with `make ui` or launch/mlflow_ui.py; pass its address as
--ui-url). Tracking store when not given: $MLFLOW_TRACKING_URI, else demo_out/runs/mlflow.db.
"""
from __future__ import annotations

import argparse
import sys

from celljepa_dist.compare import compare_runs, compare_url, render_markdown, write_comparison
from celljepa_dist.tracking import resolve_store_uri


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else demo_out/runs/mlflow.db)")
    p.add_argument("--experiment", required=True, help="experiment name, e.g. celljepa-demo")
    p.add_argument("--runs", nargs="+", default=None, metavar="ID",
                   help="run ids (default: every run of the experiment)")
    p.add_argument("--out", required=True, help="directory for comparison.md and loss_curves.png")
    p.add_argument("--ui-url", default="http://127.0.0.1:5000", help="address of the MLflow UI (default %(default)s)")
    args = p.parse_args(argv)
    try:
        comparison = compare_runs(resolve_store_uri(args.tracking_uri), args.experiment, args.runs)
        paths = write_comparison(comparison, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    print(render_markdown(comparison))
    print("written: " + ", ".join(str(v) for v in paths.values()))
    print(f"MLflow compare view: {compare_url(args.ui_url, comparison)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
