"""Finetune a pre-trained Cell-JEPA (or the scGPT baseline) on a labelled h5ad (paper 2.4, Task 1).

    deepspeed launch/finetune.py --config configs/finetune_pbmc.yaml --set init=RUN_DIR/model
    torchrun --nproc_per_node 2 launch/finetune.py --config configs/finetune_pbmc.yaml --set init=...
    python launch/finetune.py --config configs/finetune_tiny_cpu.yaml --set init=... --set data.h5ad=...
    ... --resume auto                                                   # newest committed checkpoint

The shared training loop (DeepSpeed, EMA teacher, checkpoints, MLflow) with the finetuning task
(celljepa_dist/finetune). At the end: RUN_DIR/model, RUN_DIR/eval/{val,all}/ (AvgBIO beside PCA,
UMAP), RUN_DIR/finetune_result.json. On CPU set DS_ACCELERATOR=cpu.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from celljepa_dist.finetune.config import load_finetune_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML finetuning config (configs/finetune_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set init=runs/kidney/model (repeatable)")
    p.add_argument("--resume", default=None, help="'auto' (newest committed checkpoint) or a checkpoint dir")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the model, data, objective or schedule differ from the checkpoint's")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: local sqlite store)")
    p.add_argument("--run-dir", default=None, help="shorthand for --set run_dir=...")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.allow_config_change:
        overrides.append("checkpoint.allow_config_change=true")
    if args.tracking_uri is not None:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.run_dir is not None:
        overrides.append(f"run_dir={args.run_dir}")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_finetune_config(args.config, overrides)

    from celljepa_dist.finetune.task import RESULT_FILE, FinetuneTask
    from celljepa_dist.train.loop import run

    try:
        result = run(cfg, FinetuneTask())
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # a clean gloo/nccl teardown avoids crashes at interpreter exit
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        summary = json.loads((result.run_dir / RESULT_FILE).read_text())
        val = summary.get("avgbio", {}).get("val", {})
        scores = " ".join(f"val_avgbio{k[1:]}={v:.4f}" for k, v in val.items())
        print(f"finetune done: step={result.final_step} model={summary['model']} mlflow_run_id={result.mlflow_run_id}"
              f"{' ' + scores if scores else ''}", flush=True)
    return 0


if __name__ == "__main__":
    from celljepa_dist.cli_errors import run_cli

    sys.exit(run_cli("finetune", main))
