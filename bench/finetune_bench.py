"""Task 1 of the paper on real cells: finetuning for cell-type clustering (paper 2.4, 3.2, E.2).

    python bench/finetune_bench.py [--out bench_out/finetune] [--pretrained bench_out/zero_shot]
                                   [--epochs 5] [--pretrain-epochs 2] [--data ../shared/data]

1. the real-cell pre-training of bench/zero_shot_bench.py (Kang PBMC, Baron pancreas, Moncada PDAC,
   PISCES PBMC 1k; PBMC 3k held out): its `celljepa` and `scgpt` runs under --pretrained are reused
   when both are there, otherwise pre-trained the same way for --pretrain-epochs under OUT/pretrain;
2. finetunes each on PBMC 3k (label `cell_type`, 9:1 stratified split by seed 42) with
   configs/finetune_pbmc.yaml (GEP + GEPC + supervised ECS, + JEPA for celljepa; mask 0.4, batch 64 =
   2 CPU ranks x 32, lr 1e-4 x0.9 per epoch) for --epochs epochs, in --precision (bf16 where the CPU has it natively, else fp32);
3. reports validation AvgBIO before (zero-shot: the pre-trained model's default encoder) and after
   finetuning (the finetuned student; its EMA teacher beside it) for both objectives, beside a
   50-PC PCA of the same validation cells (scib 1.1.5 AvgBIO, evaluation/).
Last line: `finetune_bench avgbio_zero_shot=<x> avgbio_finetuned=<y> avgbio_pca=<z>` (celljepa).
Each step is skipped when its output is there (a re-run only re-reports). Needs ../shared/data; exits
0 with a message when it is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import zero_shot_bench as zsb  # noqa: E402  (its data and pre-training, reused)

from celljepa_dist.cpu_features import cpu_training_precision  # noqa: E402

OBJECTIVES = ("celljepa", "scgpt")
CONFIG = REPO / "configs" / "finetune_pbmc.yaml"
HELDOUT, LABEL = zsb.HELDOUT, zsb.HELDOUT_LABEL
# CPU settings (2 ranks x 1 thread); the precision is --precision (bf16 only where the CPU has it
# natively: cpu_features.py).
CPU_SETS = ["deepspeed.threads_per_rank=1", "data.batch_size=32", "checkpoint.every_steps=100",
            "tracking.progress=false"]


def find_runs(pretrained: Path) -> dict[str, dict]:
    """The celljepa and scgpt runs (result.json: model dir, MLflow run) under a zero-shot bench dir."""
    runs = {}
    for name in OBJECTIVES:
        result = pretrained / "runs" / f"realcells_{name}" / "result.json"
        if result.exists():
            runs[name] = json.loads(result.read_text())
    return runs


def pretrained_runs(data: Path, pretrained: Path, own: Path, epochs: int, max_steps: int,
                    precision: str) -> tuple[dict[str, dict], Path]:
    """The zero-shot bench's runs when both are there; otherwise pre-trained here the same way,
    under `own` (never into the zero-shot bench's dir: its own run must keep its own budget)."""
    runs = find_runs(pretrained)
    if len(runs) == len(OBJECTIVES):
        return runs, pretrained
    runs = find_runs(own)
    missing = [name for name in OBJECTIVES if name not in runs]
    if missing:
        print(f"no pre-trained runs in {pretrained}: pre-training {missing} on real cells ({epochs} epochs"
              f"{f', max {max_steps} steps' if max_steps else ''}; {zsb.CONFIG.name}) into {own}", flush=True)
        vocab, shards, probe = zsb.build_data(data, own)
        for name in missing:
            runs[name] = zsb.pretrain(name, own, vocab, shards, probe, epochs, precision, max_steps)
    return runs, own


def finetune(name: str, init_model: str, data: Path, out: Path, epochs: int, max_steps: int, precision: str) -> dict:
    run_dir = out / "runs" / f"finetune_{name}"
    result = run_dir / "finetune_result.json"
    if not result.exists():
        zsb.launch_two_ranks(REPO / "launch" / "finetune.py", CONFIG, run_dir, [
            f"objective={name}", f"init={init_model}", f"data.h5ad={data / f'{HELDOUT}.h5ad'}",
            f"data.label_key={LABEL}", f"epochs={epochs}", f"max_steps={max_steps}",
            f"deepspeed.precision={precision}", *CPU_SETS])
    return json.loads(result.read_text())


def table(results: dict[str, dict]) -> str:
    rows = ["| objective | cells | PCA | zero-shot | finetuned (student) | finetuned (EMA teacher) | finetuned vs zero-shot "
            "| finetuned vs PCA |", "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for split in ("val", "all"):
            a = res["avgbio"][split]
            teacher = f"{a['X_finetuned_teacher']:.4f}" if "X_finetuned_teacher" in a else "n/a"
            rows.append(f"| {name} | {split} | {a['X_pca']:.4f} | {a['X_zero_shot']:.4f} | {a['X_finetuned']:.4f} | "
                        f"{teacher} | {a['X_finetuned'] - a['X_zero_shot']:+.4f} | {a['X_finetuned'] - a['X_pca']:+.4f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench_out" / "finetune"))
    p.add_argument("--pretrained", default=str(REPO / "bench_out" / "zero_shot"),
                   help="the zero-shot bench's output dir (its runs are reused; else OUT/pretrain)")
    p.add_argument("--data", default=os.environ.get("CELLJEPA_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--epochs", type=int, default=5, help="finetuning epochs (the paper: 30; BENCHMARKS.md: 5)")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="only when the pre-trained runs are absent")
    p.add_argument("--max-steps", type=int, default=0, help="cap every run's optimiser steps (smoke runs)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=cpu_training_precision(),
                   help="default: bf16 where the CPU multiplies it natively (avx512_bf16/amx_bf16), else fp32")
    args = p.parse_args(argv)
    data, out, pretrained = Path(args.data), Path(args.out), Path(args.pretrained)
    missing = [s for s in (*zsb.PRETRAIN_FILES, HELDOUT) if not (data / f"{s}.h5ad").is_file()]
    if missing:
        print(f"finetune_bench: skipped: real cells not found in {data} (missing {missing})")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    print(f"finetune_bench settings: {CONFIG.name} + {' '.join(CPU_SETS)} deepspeed.precision={args.precision}; epochs={args.epochs} "
          f"max_steps={args.max_steps or 'all'}; 2 CPU ranks; held-out {HELDOUT} (label {LABEL}); "
          f"pre-trained runs from {pretrained}", flush=True)
    t0 = time.time()
    timings = {}
    inits, source = pretrained_runs(data, pretrained, out / "pretrain", args.pretrain_epochs, args.max_steps,
                                     args.precision)
    print(f"pre-trained runs: {source}", flush=True)
    timings["pretrain_s"] = time.time() - t0
    results = {}
    for name in OBJECTIVES:
        t = time.time()
        results[name] = finetune(name, inits[name]["model"], data, out, args.epochs, args.max_steps, args.precision)
        timings[f"finetune_{name}_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    print(f"\nAvgBIO on {HELDOUT} ({results['celljepa']['val_cells']} validation cells of "
          f"{results['celljepa']['val_cells'] + results['celljepa']['train_cells']}), before (zero-shot) and after "
          f"{args.epochs} finetuning epochs, beside PCA:")
    print(table(results))
    for name, res in results.items():
        print(f"{name}: {res['reports']['val']['metrics.md']} {res['reports']['val']['umap.png']}")
    print("timings: " + ", ".join(f"{k}={v:.0f}" for k, v in timings.items()))
    for name in ("scgpt",):
        a = results[name]["avgbio"]["val"]
        print(f"finetune_bench ({name}) avgbio_zero_shot={a['X_zero_shot']:.4f} avgbio_finetuned={a['X_finetuned']:.4f} "
              f"avgbio_pca={a['X_pca']:.4f}")
    a = results["celljepa"]["avgbio"]["val"]
    print(f"finetune_bench avgbio_zero_shot={a['X_zero_shot']:.4f} avgbio_finetuned={a['X_finetuned']:.4f} "
          f"avgbio_pca={a['X_pca']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
