"""Zero-shot quality of both objectives on real cells, beside PCA (paper 3.2-3.3).

    python bench/zero_shot_bench.py [--out bench_out/zero_shot] [--epochs 5] [--data ../shared/data]

1. one vocabulary and one shard set from Kang PBMC, Baron pancreas, Moncada PDAC and PISCES PBMC 1k
   (gene symbols; Tian has Ensembl ids only and no offline mapping; PBMC 3k is held out);
2. pre-trains `celljepa`, `scgpt` (GEP + GEPC, as scGPT) and `scgpt` without GEPC (masked-value
   MSE only) with the same budget, seed and data (configs/realcells_cpu.yaml, 2 CPU ranks each, bf16 where the CPU has it natively, else fp32);
3. embeds PBMC 3k zero-shot (celljepa: EMA teacher and student; scgpt: student), each with `<cls>`
   and mean pooling, and evaluates every embedding beside a 50-PC PCA of the same cells (AvgBIO as
   scib 1.1.5; logged to the runs), with the embeddings' health: effective rank (RankMe) and mean
   pairwise cosine (celljepa_dist/health.py).
Last line: `zero_shot_bench avgbio_celljepa=<x> avgbio_scgpt=<y> avgbio_pca=<z>`.
Each step is skipped when its output is there (a re-run only re-evaluates).
Needs ../shared/data; exits 0 with a message when it is absent.
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

from celljepa_dist.cpu_features import cpu_training_precision  # noqa: E402
from celljepa_dist.launching import deepspeed_launcher, free_port  # noqa: E402

PRETRAIN_FILES = ("kang2018_pbmc_scgen", "baron2016_pancreas_came", "moncada2020_pdac_cardspa", "pbmc1k_pisces")
LABEL_KEYS = ["cell_type", "baron2016_pancreas_came=cell_ontology_class", "pbmc1k_pisces="]  # PISCES: unlabelled
NON_INTEGER = ["kang2018_pbmc_scgen"]  # log-normalised X (binning is rank-based per cell)
HELDOUT, HELDOUT_LABEL = "pbmc3k_clustifyr", "cell_type"
CONFIG = REPO / "configs" / "realcells_cpu.yaml"
# run name -> (objective, extra config overrides): the same budget, seed and data for all three
RUNS = {"celljepa": ("celljepa", []), "scgpt": ("scgpt", []), "scgpt_nogepc": ("scgpt", ["loss.w_mvc=0"])}
POOLINGS = ("cls", "mean")


def run(cmd: list, **env) -> None:
    subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, env={**os.environ, **env})


def build_data(data: Path, out: Path) -> tuple[Path, Path, Path]:
    vocab, shards = out / "vocab.json", out / "shards"
    files = [data / f"{stem}.h5ad" for stem in PRETRAIN_FILES]
    if not vocab.exists():
        run([sys.executable, REPO / "data_tools" / "build_vocab.py", "--h5ad", *files, "--gene-id-scheme", "symbol",
             "--out", vocab])
    if not (shards / "manifest.json").exists():
        run([sys.executable, REPO / "data_tools" / "h5ad_to_shards.py", "--h5ad", *files, "--gene-id-scheme", "symbol",
             "--vocab", vocab, "--out", shards, "--label-key", *LABEL_KEYS, "--allow-non-integer", *NON_INTEGER,
             "--cells-per-shard", "1000", "--no-progress"])
    probe = out / "probe_shards"  # PBMC 3k, held out: the health probe pre-training watches
    if not (probe / "manifest.json").exists():
        run([sys.executable, REPO / "data_tools" / "h5ad_to_shards.py", "--h5ad", data / f"{HELDOUT}.h5ad",
             "--gene-id-scheme", "symbol", "--vocab", vocab, "--out", probe, "--label-key", HELDOUT_LABEL,
             "--allow-non-integer", "--no-progress"])
    return vocab, shards, probe


def launch_two_ranks(script: Path, config: Path, run_dir: Path, sets: list[str]) -> None:
    """`script --config CONFIG --set ...` on 2 CPU ranks through the deepspeed launcher, resumed from
    RUN_DIR's newest committed checkpoint when it has one (an interrupted bench continues)."""
    cmd = deepspeed_launcher("--num_gpus", 2, "--master_port", free_port(), script, "--config", config)
    for assignment in [f"run_dir={run_dir}", *sets]:
        cmd += ["--set", assignment]
    if list(run_dir.glob("checkpoints/*/COMMITTED")):
        cmd += ["--resume", "auto"]
    run(cmd, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1")


def pretrain(name: str, out: Path, vocab: Path, shards: Path, probe: Path, epochs: int, precision: str,
             max_steps: int = 0) -> dict:
    objective, extra = RUNS[name]
    run_dir = out / "runs" / f"realcells_{name}"
    result = run_dir / "result.json"
    if not result.exists():
        launch_two_ranks(REPO / "launch" / "pretrain.py", CONFIG, run_dir, [
            f"objective={objective}", f"vocab={vocab}", f"data.shards_dir={shards}", f"epochs={epochs}",
            f"max_steps={max_steps}", f"tracking.probe_shards={probe}", f"deepspeed.precision={precision}", *extra])
    return json.loads(result.read_text())


def embed_heldout(data: Path, runs: dict[str, dict]):
    """obsm keys X_<run>[_student][_mean]: the run's default encoder with <cls> pooling is X_<run>."""
    import anndata

    from celljepa_dist.zero_shot import embed

    adata = anndata.read_h5ad(data / f"{HELDOUT}.h5ad")
    keys = []
    for name, result in runs.items():
        encoders = ("teacher", "student") if RUNS[name][0] == "celljepa" else ("student",)
        for encoder in encoders:
            for pooling in POOLINGS:
                key = f"X_{name}" + (f"_{encoder}" if encoder != encoders[0] else "") + \
                      (f"_{pooling}" if pooling != "cls" else "")
                adata.obsm[key] = embed(result["model"], adata, encoder=encoder, pooling=pooling, progress=False)
                keys.append(key)
    return adata, keys


def health_table(adata, keys: list[str], results: dict) -> str:
    """AvgBIO beside the embeddings' effective rank and mean pairwise cosine (PCA included)."""
    from celljepa_dist.health import health_metrics

    rows = ["| embedding | AvgBIO | vs PCA | effective rank (RankMe) | mean pairwise cosine | top-3 PC variance |",
            "|---|---|---|---|---|---|"]
    for key in ["X_pca", *keys]:
        h = health_metrics(adata.obsm[key])
        delta = results[key]["avgbio"] - results["X_pca"]["avgbio"]
        rows.append(f"| `{key}` | {results[key]['avgbio']:.4f} | {'baseline' if key == 'X_pca' else f'{delta:+.4f}'} "
                    f"| {h.rankme:.1f} of {min(h.n_cells, h.dim)} | {h.mean_cos:.3f} | {h.top3_var:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench_out" / "zero_shot"))
    p.add_argument("--data", default=os.environ.get("CELLJEPA_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--precision", choices=("bf16", "fp32"), default=cpu_training_precision(),
                   help="default: bf16 where the CPU multiplies it natively (avx512_bf16/amx_bf16), else fp32")
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    missing = [s for s in (*PRETRAIN_FILES, HELDOUT) if not (data / f"{s}.h5ad").is_file()]
    if missing:
        print(f"zero_shot_bench: skipped: real cells not found in {data} (missing {missing})")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    vocab, shards, probe = build_data(data, out)
    timings = {"data_s": time.time() - t0}
    runs = {}
    for name in RUNS:
        t = time.time()
        runs[name] = pretrain(name, out, vocab, shards, probe, args.epochs, args.precision)
        timings[f"pretrain_{name}_s"] = time.time() - t

    from celljepa_dist.evaluation import evaluate_embeddings, log_to_mlflow, markdown_table, write_report

    t = time.time()
    adata, keys = embed_heldout(data, runs)
    results = evaluate_embeddings(adata, HELDOUT_LABEL, keys, baseline="pca")
    paths = write_report(results, adata, HELDOUT_LABEL, out / "eval")
    tracking = f"sqlite:///{(out / 'runs' / 'mlflow.db').resolve()}"
    for name, result in runs.items():
        mine = {k: v for k, v in results.items() if k == "X_pca" or k == f"X_{name}" or
                (k.startswith(f"X_{name}_") and not k.startswith(f"X_{name}_nogepc"))}
        log_to_mlflow(mine, result["mlflow_run_id"], tracking, HELDOUT,
                      artifacts=[paths["metrics.md"], paths["umap.png"]])
    timings["embed_evaluate_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    print(f"\nzero-shot AvgBIO on {HELDOUT} ({adata.n_obs} cells, label {HELDOUT_LABEL}), models pre-trained on "
          f"{', '.join(PRETRAIN_FILES)} ({args.epochs} epochs, {CONFIG.name}, {args.precision}):")
    print(markdown_table(results))
    print()
    print(health_table(adata, keys, results))
    print("timings: " + ", ".join(f"{k}={v:.0f}" for k, v in timings.items()))
    print(f"report: {paths['metrics.md']} {paths['umap.png']}")
    print("zero_shot_bench (all) " + " ".join(f"avgbio{k[1:]}={v['avgbio']:.4f}" for k, v in results.items()))
    print(f"zero_shot_bench avgbio_celljepa={results['X_celljepa']['avgbio']:.4f} "
          f"avgbio_scgpt={results['X_scgpt']['avgbio']:.4f} avgbio_pca={results['X_pca']['avgbio']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
