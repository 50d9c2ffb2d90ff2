"""Finetune a pre-trained model for perturbation-response prediction (paper 2.5, 3.4, E.3) and
report GEARS' metrics beside simple baselines.

    deepspeed launch/perturb.py --config configs/perturb_norman.yaml --set init=RUN/model
    python launch/perturb.py --config configs/perturb_tiny.yaml --set init=DIR --variants scgpt
    ... --resume auto                      # each variant from its newest committed checkpoint

Each variant (`celljepa`: + JEPA against a frozen teacher; `scgpt`: without) trains in
RUN_DIR/<variant> through the shared training loop (checkpoints, resume, MLflow) and evaluates its
best epoch (validation `pearson`) on the test perturbations. RUN_DIR/perturb_metrics.json
({method: {subgroup: {metric: value}}}), perturb_metrics.md and perturb_deltas.png then hold every
variant and every baseline side by side. On CPU set DS_ACCELERATOR=cpu.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from celljepa_dist.launch_args import run_overrides, run_parser

VARIANTS = ("celljepa", "scgpt")


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__, "YAML perturbation config (configs/perturb_*.yaml)", "init=runs/pretrain/model")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated objectives to train, each in RUN_DIR/<variant> (default: both)")
    return p.parse_args(argv)


def variant_overrides(args, variant: str, run_dir: Path) -> list[str]:
    """The run's overrides for one variant: its objective and its own RUN_DIR/<variant>."""
    return run_overrides(args, run_dir=False) + [f"objective={variant}", f"run_dir={run_dir / variant}"]


def combine(run_dir: Path, variants: list[str]) -> Path:
    """RUN_DIR/perturb_metrics.{json,md} and perturb_deltas.png over every variant and baseline."""
    import numpy as np

    from celljepa_dist.perturb.gears_data import load_gears_dir
    from celljepa_dist.perturb.report import DELTAS_PNG, METRICS_JSON, plot_deltas, shown_perturbations, write_metrics
    from celljepa_dist.perturb.split import SPLIT_FILE, load_split

    results: dict = {}
    preds: dict = {}
    for v in variants:
        mine = json.loads((run_dir / v / METRICS_JSON).read_text())
        results.update(mine)  # the baselines are identical in every variant (same data and split)
        with np.load(run_dir / v / "perturb_predictions.npz") as z:
            for key in z.files:
                method, pert = key.split("::", 1)
                preds.setdefault(method, {})[pert] = z[key]
    write_metrics(run_dir, results, variants)
    import yaml

    cfg = yaml.safe_load((run_dir / variants[0] / "config.yaml").read_text())
    data = load_gears_dir(cfg["data"]["gears_dir"])
    split = load_split(run_dir / variants[0] / SPLIT_FILE)
    shown = shown_perturbations(split.test_subgroups)
    plot_deltas(run_dir / DELTAS_PNG, {p: data.mean(p) for p in shown}, data.control_mean(),
                {m: preds[m] for m in [*variants, "additive"]}, list(shown), shown)
    return run_dir / METRICS_JSON


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from celljepa_dist.perturb.config import load_perturb_config

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"--variants: {bad or variants} not among {list(VARIANTS)}")
    base = load_perturb_config(args.config, list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else []))
    run_dir = Path(base.run_dir)
    cfgs = {v: load_perturb_config(args.config, variant_overrides(args, v, run_dir)
                                   + ([f"run_dir={run_dir / v}"])) for v in variants}

    from celljepa_dist.perturb.task import PerturbTask
    from celljepa_dist.train.loop import run

    results = {}
    try:
        for v in variants:
            results[v] = run(cfgs[v], PerturbTask())
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        path = combine(run_dir, variants)
        summary = json.loads(path.read_text())
        line = " ".join(f"{m}={summary[m]['unseen_single']['pearson_delta']:.4f}" for m in summary
                        if "unseen_single" in summary[m])
        print(f"perturb done: {path} (unseen_single pearson_delta: {line}) "
              f"mlflow_run_ids={ {v: r.mlflow_run_id for v, r in results.items()} }", flush=True)
    return 0


if __name__ == "__main__":
    from celljepa_dist.cli_errors import run_cli

    sys.exit(run_cli("perturb", main))
