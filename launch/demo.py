"""`make demo`: the main job on the embedded default, step by step, idempotent.

    python launch/demo.py --out demo_out [--cells 20000]
Steps (each skipped when its output is already there and verified):
  1. simulate a local store shaped like the CELLxGENE Census   -> OUT/census
  2. build the gene vocabulary from it                          -> OUT/vocab.json
  3. stream the kidney cells into shards, minus one dataset     -> OUT/shards
  4. validate the shards against the manifest, plot a summary   -> OUT/shards_summary.png
  5. the held-out dataset as shards: the health probe           -> OUT/probe_shards
  6. pre-train both objectives (2 CPU ranks each), export them  -> OUT/runs/tiny_*/{model,health.png}
  7. the held-out kidney dataset's cells as an h5ad             -> OUT/heldout_kidney.h5ad
  8. embed them zero-shot with both models                      -> OUT/heldout_embedded.h5ad
  9. AvgBIO of both beside PCA, logged to the MLflow runs       -> OUT/eval/{metrics.md,umap.png}
 10. compare the two runs from MLflow                           -> OUT/comparison/{comparison.md,loss_curves.png}
 11. finetune both on the held-out cells' labels (paper Task 1)  -> OUT/runs/finetune_*/{model,eval,finetune_result.json}
 12. perturbation prediction on a simulated screen over the vocab's genes, from the pre-trained
     celljepa model: both variants beside the GEARS baselines     -> OUT/runs/perturb/{perturb_metrics.md,perturb_deltas.png}
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from celljepa_dist.data.build import ShardBuildConfig, build_shards
from celljepa_dist.data.census import CensusSource, CensusSourceConfig
from celljepa_dist.data.shards import MANIFEST_NAME, validate_shards
from celljepa_dist.data.simulate import SimulationConfig, write_store
from celljepa_dist.data.summary import plot_shard_summary, summarize_shards
from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.launching import deepspeed_launcher, free_port


@dataclass
class Demo:
    out: Path
    cells: int = 20_000
    seed: int = 0
    cells_per_shard: int = 2_000

    @property
    def census(self) -> Path:
        return self.out / "census"

    @property
    def vocab(self) -> Path:
        return self.out / "vocab.json"

    @property
    def shards(self) -> Path:
        return self.out / "shards"

    @property
    def probe(self) -> Path:
        return self.out / "probe_shards"


def step_simulate(d: Demo) -> str:
    write_store(d.census, SimulationConfig(cells=d.cells, seed=d.seed))  # returns at once if already there
    return f"Census-shaped store ({d.cells} cells): {d.census}"


def step_vocab(d: Demo) -> str:
    if not d.vocab.exists():
        with CensusSource(CensusSourceConfig(uri=str(d.census))) as src:
            GeneVocab.from_genes(src.feature_ids, src.feature_names).save(d.vocab)
    v = GeneVocab.load(d.vocab)
    return f"vocab ({len(v)} tokens, sha256 {v.sha256[:12]}): {d.vocab}"


KIDNEY = "tissue_general == 'kidney' and is_primary_data == True"


def heldout_dataset(census: Path) -> str:
    """The smallest primary kidney dataset: never seen in pre-training, embedded zero-shot after."""
    import cellxgene_census

    with cellxgene_census.open_soma(uri=str(census)) as c:
        obs = c["census_data"]["homo_sapiens"].obs.read(value_filter=KIDNEY, column_names=["dataset_id"])
        sizes = obs.concat().to_pandas()["dataset_id"].value_counts()
    return str(min(sizes.index, key=lambda ds: (sizes[ds], ds)))


def step_shards(d: Demo) -> str:
    held = heldout_dataset(d.census)
    if not (d.shards / MANIFEST_NAME).exists():  # a partial run resumes: verified shards are skipped
        cfg = CensusSourceConfig(uri=str(d.census), obs_filter=f"{KIDNEY} and dataset_id != '{held}'")
        with CensusSource(cfg) as src:
            build_shards(src, GeneVocab.load(d.vocab), ShardBuildConfig(out=str(d.shards), cells_per_shard=d.cells_per_shard))
    return f"shards (kidney, primary cells, dataset {held[:8]}... held out): {d.shards}"


def step_validate(d: Demo) -> str:
    vocab = GeneVocab.load(d.vocab)
    faults = validate_shards(d.shards, vocab.sha256, len(vocab))
    if faults:
        raise SystemExit("shard validation failed:\n  " + "\n  ".join(faults))
    s = summarize_shards(d.shards)
    png = plot_shard_summary(s, d.out / "shards_summary.png")
    return (f"validated {s['total_cells']} cells in {s['shards']} shards, median {s['genes_per_cell_median']:.0f} "
            f"genes/cell, {s['bytes_per_expressed_gene']:.1f} B/gene; plot: {png}")


def step_probe(d: Demo) -> str:
    """The held-out dataset's cells as shards too: the health probe that pre-training watches."""
    held = heldout_dataset(d.census)
    if not (d.probe / MANIFEST_NAME).exists():
        cfg = CensusSourceConfig(uri=str(d.census), obs_filter=f"{KIDNEY} and dataset_id == '{held}'")
        with CensusSource(cfg) as src:
            build_shards(src, GeneVocab.load(d.vocab), ShardBuildConfig(out=str(d.probe), cells_per_shard=d.cells_per_shard))
    return f"health probe (held-out dataset {held[:8]}...): {d.probe}"


STEPS = [("simulate", step_simulate), ("vocab", step_vocab), ("shards", step_shards), ("validate", step_validate),
         ("probe", step_probe)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cells", type=int, default=Demo.cells)
    p.add_argument("--seed", type=int, default=Demo.seed)
    p.add_argument("--cells-per-shard", type=int, default=Demo.cells_per_shard)
    p.add_argument("--skip", default="", metavar="STEP[,STEP]",
                   help="leave out these steps (e.g. finetune,perturb: they only read earlier steps' outputs)")
    args = p.parse_args(argv)
    names = [name for name, _ in STEPS]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(names):
        p.error(f"--skip: {sorted(skip - set(names))} are not steps; steps: {names}")
    d = Demo(Path(args.out), args.cells, args.seed, args.cells_per_shard)
    d.out.mkdir(parents=True, exist_ok=True)
    for i, (name, step) in enumerate(STEPS, 1):
        if name in skip:
            print(f"[{i}/{len(STEPS)}] {name}: skipped (--skip)", flush=True)
            continue
        t = time.time()
        print(f"[{i}/{len(STEPS)}] {name} ...", flush=True)
        print(f"[{i}/{len(STEPS)}] {name}: {step(d)} ({time.time() - t:.1f}s)", flush=True)
    return 0


# --- pre-training (owned by the training engineer) ---------------------------------------------
REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def pretrain_one(d: Demo, objective: str, ranks: int = 2) -> dict:
    """2-rank CPU pre-training of one objective through the deepspeed launcher; resumes if cut."""
    import json
    import os
    import subprocess

    run_dir = d.out / "runs" / f"tiny_{objective}"
    result = run_dir / "result.json"
    if not result.exists():
        cmd = deepspeed_launcher("--num_gpus", ranks, "--master_port", free_port(), REPO / "launch" / "pretrain.py",
                                 "--config", PRETRAIN_CONFIG, "--set", f"objective={objective}",
                                 "--set", f"run_dir={run_dir}", "--set", f"vocab={d.vocab}",
                                 "--set", f"data.shards_dir={d.shards}", "--set", f"tracking.probe_shards={d.probe}",
                                 "--set", f"tracking.probe_cells={probe_cells(d)}")
        if list(run_dir.glob("checkpoints/*/COMMITTED")):
            cmd += ["--resume", "auto"]  # an interrupted demo continues where it stopped
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True)
    return json.loads(result.read_text())


def probe_cells(d: Demo, most: int = 256) -> int:
    """The whole held-out dataset up to `most` cells (a small --cells demo holds fewer)."""
    import json

    return min(most, json.loads((d.probe / MANIFEST_NAME).read_text())["total_cells"])


def step_pretrain(d: Demo) -> str:
    from celljepa_dist.train.report import plot_loss_curves

    results = {obj: pretrain_one(d, obj) for obj in ("celljepa", "scgpt")}
    png = plot_loss_curves({obj: d.out / "runs" / f"tiny_{obj}" for obj in results}, d.out / "pretrain_losses.png")
    lines = [f"{obj}: {r['final_step']} steps, checkpoint {r['checkpoint']}, MLflow run {r['mlflow_run_id']}"
             for obj, r in results.items()]
    store = (d.out / "runs" / "mlflow.db").resolve()
    return "\n    " + "\n    ".join(lines) + f"\n    MLflow store: sqlite:///{store}; loss curves: {png}"


STEPS.append(("pretrain", step_pretrain))


# --- export, zero-shot embedding, evaluation, comparison -----------------------------------------
OBJECTIVES = ("celljepa", "scgpt")
HELDOUT_NAME = "heldout_kidney"


def run_dir_of(d: Demo, objective: str) -> Path:
    return d.out / "runs" / f"tiny_{objective}"


def step_export(d: Demo) -> str:
    """pretrain.py exports RUN_DIR/model at its end; an older run dir gets it here."""
    from celljepa_dist.export import export_checkpoint
    from celljepa_dist.train.checkpoint import committed_checkpoints

    lines = []
    for obj in OBJECTIVES:
        run_dir = run_dir_of(d, obj)
        model_dir = run_dir / "model"
        if not (model_dir / "config.json").exists():
            export_checkpoint(committed_checkpoints(run_dir / "checkpoints")[-1], model_dir)
        lines.append(f"{obj}: {model_dir}")
    return "\n    " + "\n    ".join(lines)


def step_heldout(d: Demo) -> str:
    """The held-out dataset's raw counts, as a user would bring them (h5ad, Ensembl ids in var)."""
    import cellxgene_census

    from celljepa_dist.atomic import atomic_path

    path = d.out / f"{HELDOUT_NAME}.h5ad"
    held = heldout_dataset(d.census)
    if not path.exists():
        with cellxgene_census.open_soma(uri=str(d.census)) as c:
            adata = cellxgene_census.get_anndata(c, "Homo sapiens", X_name="raw",
                                                 obs_value_filter=f"{KIDNEY} and dataset_id == '{held}'")
        adata.var_names = adata.var["feature_id"].astype(str).to_numpy()
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
    return f"held-out dataset {held}: {path}"


def step_embed(d: Demo) -> str:
    import anndata

    from celljepa_dist import embed
    from celljepa_dist.atomic import atomic_path

    out = d.out / "heldout_embedded.h5ad"
    if not out.exists():
        adata = anndata.read_h5ad(d.out / f"{HELDOUT_NAME}.h5ad")
        for obj in OBJECTIVES:  # celljepa: the EMA teacher; scgpt has none: its student
            adata.obsm[f"X_{obj}"] = embed(run_dir_of(d, obj) / "model", adata)
        with atomic_path(out) as tmp:
            adata.write_h5ad(tmp)
    return f"zero-shot <cls> embeddings X_celljepa, X_scgpt: {out}"


def step_evaluate(d: Demo) -> str:
    import json

    import anndata

    from celljepa_dist.evaluation import evaluate_embeddings, log_to_mlflow, markdown_table, write_report

    adata = anndata.read_h5ad(d.out / "heldout_embedded.h5ad")
    results = evaluate_embeddings(adata, "cell_type", [f"X_{obj}" for obj in OBJECTIVES], baseline="pca")
    paths = write_report(results, adata, "cell_type", d.out / "eval")
    for obj in OBJECTIVES:  # each run gets its own embedding's metrics and the baseline beside them
        run = json.loads((run_dir_of(d, obj) / "result.json").read_text())
        mine = {k: v for k, v in results.items() if k in (f"X_{obj}", "X_pca")}
        log_to_mlflow(mine, run["mlflow_run_id"], tracking_uri(d), HELDOUT_NAME,
                      artifacts=[paths["metrics.md"], paths["umap.png"]])
    return "\n" + markdown_table(results) + f"\n    report: {paths['metrics.md']}, {paths['umap.png']}"


def tracking_uri(d: Demo) -> str:
    return f"sqlite:///{(d.out / 'runs' / 'mlflow.db').resolve()}"


def step_compare(d: Demo) -> str:
    import json

    from celljepa_dist.compare import compare_runs, compare_url, write_comparison

    ids = [json.loads((run_dir_of(d, obj) / "result.json").read_text())["mlflow_run_id"] for obj in OBJECTIVES]
    comparison = compare_runs(tracking_uri(d), PRETRAIN_EXPERIMENT, ids)
    paths = write_comparison(comparison, d.out / "comparison")
    text = paths["markdown"].read_text()
    return (f"\n{text}\n    {paths['markdown']}, {paths['loss_curves']}\n"
            f"    in MLflow (`make ui`): {compare_url('http://127.0.0.1:5000', comparison)}")


PRETRAIN_EXPERIMENT = "celljepa-demo"  # configs/tiny_cpu.yaml: tracking.experiment
STEPS += [("export", step_export), ("heldout", step_heldout), ("embed", step_embed), ("evaluate", step_evaluate),
          ("compare", step_compare)]


# --- finetuning (paper Task 1) --------------------------------------------------------------------
FINETUNE_CONFIG = REPO / "configs" / "finetune_tiny_cpu.yaml"


def finetune_cells(d: Demo) -> Path:
    """The held-out dataset's labelled cells (a type with a single cell cannot be split 9:1): the
    simulator's genes are invented, so the demo's models can only be finetuned on its own cells."""
    import anndata

    from celljepa_dist.atomic import atomic_path

    path = d.out / "finetune_cells.h5ad"
    if not path.exists():
        adata = anndata.read_h5ad(d.out / f"{HELDOUT_NAME}.h5ad")
        counts = adata.obs["cell_type"].value_counts()
        adata = adata[adata.obs["cell_type"].isin(counts[counts >= 2].index)].copy()
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
    return path


def step_finetune(d: Demo) -> str:
    """Both pre-trained models finetuned (GEP + GEPC + ECS, + JEPA for celljepa; 2 CPU ranks),
    tracked in the demo's store as children of their pre-training runs."""
    import json
    import os
    import subprocess

    cells, lines = finetune_cells(d), []
    for obj in OBJECTIVES:
        run_dir = d.out / "runs" / f"finetune_{obj}"
        result = run_dir / "finetune_result.json"
        if not result.exists():
            cmd = deepspeed_launcher("--num_gpus", 2, "--master_port", free_port(), REPO / "launch" / "finetune.py",
                                     "--config", FINETUNE_CONFIG, "--set", f"objective={obj}",
                                     "--set", f"init={run_dir_of(d, obj) / 'model'}", "--set", f"data.h5ad={cells}",
                                     "--set", f"run_dir={run_dir}", "--set", f"tracking.uri={tracking_uri(d)}")
            if list(run_dir.glob("checkpoints/*/COMMITTED")):
                cmd += ["--resume", "auto"]
            env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, env=env, check=True)
        val = json.loads(result.read_text())["avgbio"]["val"]
        lines.append(f"{obj}: validation AvgBIO zero-shot {val['X_zero_shot']:.4f} -> finetuned "
                     f"{val['X_finetuned']:.4f} (PCA {val['X_pca']:.4f}); {run_dir / 'eval'}")
    return "\n    " + "\n    ".join(lines)


STEPS.append(("finetune", step_finetune))


# --- perturbation prediction (paper Task 3) ----------------------------------------------------------
PERTURB_CONFIG = REPO / "configs" / "perturb_tiny.yaml"
# A small screen (about a minute of training on 2 cores): 12 single and 20 combo perturbations.
PERTURB_SCREEN = ("--genes", "200", "--perturbed-genes", "12", "--combos", "20", "--cells-per-perturbation", "20")


def step_perturb(d: Demo) -> str:
    """A simulated Perturb-seq screen on the demo vocabulary's genes (known effects), both model
    variants trained from the pre-trained celljepa model, scored with GEARS' metrics beside the
    control-mean, mean-shift, additive and linear baselines."""
    import json
    import os
    import subprocess

    gears, run_dir = d.out / "perturb_gears", d.out / "runs" / "perturb"
    if not (gears / "perturb_processed.h5ad").exists():
        subprocess.run([sys.executable, str(REPO / "data_tools" / "simulate_perturb.py"), "--out", str(gears),
                        "--vocab", str(d.out / "vocab.json"), *PERTURB_SCREEN], check=True)
    metrics = run_dir / "perturb_metrics.json"
    if not metrics.exists():
        cmd = [sys.executable, str(REPO / "launch" / "perturb.py"), "--config", str(PERTURB_CONFIG),
               "--set", f"init={run_dir_of(d, 'celljepa') / 'model'}", "--set", f"data.gears_dir={gears}",
               "--run-dir", str(run_dir), "--tracking-uri", tracking_uri(d)]
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True)
    summary = json.loads(metrics.read_text())
    scores = {m: groups["unseen_single"]["pearson_delta"] for m, groups in summary.items() if "unseen_single" in groups}
    best_baseline = max((m for m in scores if m not in OBJECTIVES), key=scores.get)
    line = ", ".join(f"{m} {v:.3f}" for m, v in scores.items())
    return (f"unseen singles, pearson_delta: {line}; best baseline: {best_baseline}"
            f"\n    {run_dir / 'perturb_metrics.md'}, {run_dir / 'perturb_deltas.png'}")


STEPS.append(("perturb", step_perturb))


if __name__ == "__main__":
    sys.exit(main())
