"""Pre-train Cell-JEPA (or the scGPT baseline) with DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny_cpu.yaml --set objective=scgpt
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/pretrain_kidney.yaml
    python launch/pretrain.py --config configs/tiny_cpu.yaml          # one rank
    ... --resume auto                                                   # newest committed checkpoint

On CPU set DS_ACCELERATOR=cpu (ranks talk over gloo).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from celljepa_dist.config import load_config
from celljepa_dist.launch_args import run_overrides, run_parser


def parse_args(argv=None) -> argparse.Namespace:
    return run_parser(__doc__, "YAML run config (see configs/)", "optim.lr=3e-4").parse_args(argv)


def write_result(result, last_checkpoint, model_dir) -> None:
    """`run_dir/result.json`: the finished run at a glance (and the demo's "already done" marker)."""
    from celljepa_dist.atomic import atomic_write_text

    atomic_write_text(Path(result.run_dir) / "result.json", json.dumps(
        {"final_step": result.final_step, "checkpoint": str(last_checkpoint) if last_checkpoint else None,
         "model": str(model_dir) if model_dir else None, "mlflow_run_id": result.mlflow_run_id}, indent=2))


def finish_run(result):
    """Rank 0, after every rank is done: export the final checkpoint to RUN_DIR/model/ (the
    offline path `launch/export.py` takes too, so both give the same files). Returns (checkpoint,
    model dir)."""
    from celljepa_dist.export import MODEL_DIR_NAME, export_checkpoint, exported_from
    from celljepa_dist.train.checkpoint import committed_checkpoints

    # A resume that found the run already finished commits nothing new: its newest commit is final.
    found = committed_checkpoints(Path(result.run_dir) / "checkpoints")
    last = found[-1] if found else None
    if last is None:
        return None, None
    model_dir = Path(result.run_dir) / MODEL_DIR_NAME
    if not exported_from(model_dir, last):  # a finished run resumed again: its export stands
        export_checkpoint(last, model_dir)
    return last, model_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = run_overrides(args)
    cfg = load_config(args.config, overrides)

    from celljepa_dist.train.loop import run

    try:
        result = run(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # a clean gloo/nccl teardown avoids crashes at interpreter exit
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        last, model_dir = finish_run(result)
        write_result(result, last, model_dir)
        print(f"pretrain done: step={result.final_step} checkpoint={last} model={model_dir} "
              f"mlflow_run_id={result.mlflow_run_id}", flush=True)
    return 0


if __name__ == "__main__":
    from celljepa_dist.cli_errors import run_cli

    sys.exit(run_cli("pretrain", main))
