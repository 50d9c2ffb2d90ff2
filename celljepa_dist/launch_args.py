"""The command line every training launcher shares (pretrain, finetune, perturb): the config,
`--set` overrides, resume, tracking and run-dir shorthands, and DeepSpeed's `--local_rank`.
`run_overrides` turns the shorthands into `--set` assignments, so a config is only ever changed
one way."""
from __future__ import annotations

import argparse
import os


def run_parser(doc: str, config_help: str, set_example: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {set_example} (repeatable)")
    p.add_argument("--resume", default=None, help="'auto' (newest committed checkpoint) or a checkpoint dir")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the model, data, objective or schedule differ from the checkpoint's")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: local sqlite store)")
    p.add_argument("--run-dir", default=None, help="shorthand for --set run_dir=...")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def run_overrides(args: argparse.Namespace, run_dir: bool = True) -> list[str]:
    """`--set` assignments from the parsed arguments (the shorthands last, so they win). Sets
    LOCAL_RANK from DeepSpeed's `--local_rank` when the environment lacks it."""
    sets = list(args.overrides)
    if args.resume is not None:
        sets.append(f"checkpoint.resume={args.resume}")
    if args.allow_config_change:
        sets.append("checkpoint.allow_config_change=true")
    if args.tracking_uri is not None:
        sets.append(f"tracking.uri={args.tracking_uri}")
    if run_dir and args.run_dir is not None:
        sets.append(f"run_dir={args.run_dir}")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return sets
