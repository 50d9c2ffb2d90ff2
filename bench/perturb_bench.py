"""Perturbation-response prediction on the simulated screen: both model variants beside the baselines.

    python bench/perturb_bench.py [--out bench_out/perturb] [--init DIR] [--epochs 6] [--ranks 1]

1. the init model: --init (a save_pretrained dir, e.g. the demo's demo_out/runs/tiny_celljepa/model),
   or else a fresh tiny CellJEPA (d_model 64, 2 layers) over the Census simulator's genes, saved as
   a model directory: an *untrained* init, so the figures measure the perturbation pipeline, not
   pre-training;
2. a simulated GEARS directory on the init's first --genes genes (data_tools/simulate_perturb.py;
   strong known effects: knock-downs, a shared response, module programs, partly non-additive combos);
3. launch/perturb.py trains `celljepa` and `scgpt` (configs/perturb_tiny.yaml, lr 3e-3, --epochs) and
   evaluates each variant's best epoch and every baseline on the test perturbations (GEARS metrics).
Last line: `perturb_bench pearson_delta_celljepa=<x> pearson_delta_scgpt=<y> pearson_delta_best_baseline=<z>`
(unseen singles; the line before names the best baseline). Each step is skipped when its output is there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from celljepa_dist.launching import deepspeed_launcher, free_port  # noqa: E402

CONFIG = REPO / "configs" / "perturb_tiny.yaml"


def fresh_init(out: Path, genes: int) -> Path:
    import torch

    from celljepa_dist.data.vocab import GeneVocab
    from celljepa_dist.model import CellJEPA
    from celljepa_dist.model.config import ModelConfig
    from celljepa_dist.model.pretrained import save_pretrained
    from celljepa_dist.perturb.simulate import genes_from_census_simulator

    ids, names = genes_from_census_simulator(genes)
    vocab = GeneVocab.from_genes(ids, names)
    out.mkdir(parents=True, exist_ok=True)
    vocab.save(out / "vocab.json")
    cfg = ModelConfig(vocab_size=len(vocab), d_model=64, n_layers=2, n_heads=4, d_hid=64, dropout=0.0,
                      attention_backend="reference")
    torch.manual_seed(0)
    return save_pretrained(CellJEPA(cfg), out / "init", vocab_path=out / "vocab.json",
                           data={"n_bins": cfg.n_bins, "max_genes": 128, "binning_rule": "untrained"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/perturb")
    p.add_argument("--init", default=None, help="a save_pretrained dir (default: a fresh tiny model)")
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--perturbed-genes", type=int, default=24)
    p.add_argument("--combos", type=int, default=60)
    p.add_argument("--cells-per-perturbation", type=int, default=40)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-genes", type=int, default=128)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--variants", default="celljepa,scgpt")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    init = Path(args.init).resolve() if args.init else out / "init"
    if args.init is None and not (init / "config.json").exists():
        fresh_init(out, args.genes)
    gears = out / "gears"
    if not (gears / "simulation.json").exists():
        subprocess.run([sys.executable, str(REPO / "data_tools" / "simulate_perturb.py"), "--out", str(gears),
                        "--vocab", str(init / "vocab.json"), "--genes", str(args.genes),
                        "--perturbed-genes", str(args.perturbed_genes), "--combos", str(args.combos),
                        "--cells-per-perturbation", str(args.cells_per_perturbation)], check=True, cwd=REPO)
    run_dir = out / "run"
    metrics = run_dir / "perturb_metrics.json"
    if not metrics.exists():
        head = deepspeed_launcher("--num_gpus", args.ranks, "--master_port", free_port(), REPO / "launch" / "perturb.py") \
            if args.ranks > 1 else [sys.executable, REPO / "launch" / "perturb.py"]
        cmd = [*map(str, head), "--config", str(CONFIG), "--run-dir", str(run_dir), "--variants", args.variants,
               "--set", f"init={init}", "--set", f"data.gears_dir={gears}", "--set", f"epochs={args.epochs}",
               "--set", f"optim.lr={args.lr}", "--set", f"data.max_genes={args.max_genes}",
               "--set", "data.eval_cells_per_perturbation=0"]
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
    results = json.loads(metrics.read_text())
    print((run_dir / "perturb_metrics.md").read_text())
    from celljepa_dist.perturb.report import best_baseline

    name, value = best_baseline(results, "unseen_single", "pearson_delta")
    unseen = {m: results[m]["unseen_single"]["pearson_delta"] for m in results}
    print(f"unseen_single pearson_delta: {json.dumps({k: round(v, 4) for k, v in unseen.items()})}; best baseline "
          f"{name}; {time.perf_counter() - started:.0f} s")
    fmt = {v: f"{unseen[v]:.4f}" if v in unseen else "nan" for v in ("celljepa", "scgpt")}
    print(f"perturb_bench pearson_delta_celljepa={fmt['celljepa']} pearson_delta_scgpt={fmt['scgpt']} "
          f"pearson_delta_best_baseline={value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
