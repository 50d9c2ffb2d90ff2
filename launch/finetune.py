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
from celljepa_dist.launch_args import run_overrides, run_parser


def parse_args(argv=None) -> argparse.Namespace:
    return run_parser(__doc__, "YAML finetuning config (configs/finetune_*.yaml)", "init=runs/kidney/model").parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = run_overrides(args)
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
