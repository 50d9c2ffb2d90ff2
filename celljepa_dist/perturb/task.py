"""Perturbation training as a task of the one training loop (train/task.py).

    prepare       init model's config + vocab, the GEARS directory, GEARS' simulation split (saved
                  as RUN_DIR/perturb_split.json), the cells the model sees
    build_model   PerturbModel with the init's student, value head and predictor (same on every rank)
    teacher       celljepa: a frozen copy of the pre-trained student (EMA momentum 1); scgpt: none
    after_epoch   validation perturbations: GEARS metrics, `val/<metric>`; the best epoch by
                  `best_metric` (pearson) keeps its weights in RUN_DIR/best_model/ (task state)
    finish        rank 0: the best epoch's model and every baseline on the test perturbations ->
                  perturb_metrics.json / .md / perturb_deltas.png, test metrics in MLflow
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from celljepa_dist.atomic import atomic_path, atomic_write_text
from celljepa_dist.train.task import Prepared, TaskBase, TeacherSpec

from .config import PerturbConfig
from .metrics import evaluate_predictions, subgroup_means

BEST_DIR, BEST_WEIGHTS, BEST_JSON = "best_model", "model.safetensors", "best.json"
PER_PERTURBATION_JSON = "perturb_metrics_per_perturbation.json"
DATA_KEYS = ("data.batch_size", "data.max_genes", "data.seed", "data.split", "data.split_seed",
             "data.train_gene_set_size", "data.combo_seen2_train_frac", "init", "best_metric")


def init_model_config(cfg: PerturbConfig):
    """The init directory's ModelConfig with this run's attention kernel and dropout."""
    from celljepa_dist.model.pretrained import load_config

    return load_config(cfg.init, attention_backend=cfg.model.attention_backend, flash_kernel=cfg.model.flash_kernel,
                       dropout=cfg.model.dropout)


def overall(per_pert: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over all the perturbations given (GEARS' compute_metrics over val)."""
    metrics = next(iter(per_pert.values())).keys()
    return {m: float(np.mean([v[m] for v in per_pert.values()])) for m in metrics}


class PerturbTask(TaskBase):
    name = "perturb"

    def __init__(self):
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.history: list[dict] = []

    # -- setup -----------------------------------------------------------------------------------
    def prepare(self, cfg: PerturbConfig, info) -> Prepared:
        from celljepa_dist.data.vocab import GeneVocab
        from celljepa_dist.model.pretrained import VOCAB_FILE, load_meta

        from .data import PerturbCells, batches_per_epoch
        from .gears_data import is_combo, load_gears_dir
        from .split import SPLIT_FILE, check_subgroups, save_split, simulation_split

        init = Path(cfg.init)
        meta = load_meta(init)
        vocab_path = init / VOCAB_FILE
        if not vocab_path.is_file():
            raise FileNotFoundError(f"{vocab_path}: the init model has no vocab.json; its genes cannot be matched")
        vocab = GeneVocab.load(vocab_path)
        if meta.get("vocab_sha256") not in (None, vocab.sha256):
            raise ValueError(f"{init}: config.json's vocab_sha256 does not match its vocab.json")
        data = load_gears_dir(cfg.data.gears_dir)
        split = simulation_split(data.perturbations, cfg.data.split_seed, cfg.data.train_gene_set_size,
                                 cfg.data.combo_seen2_train_frac)
        check_subgroups(split, cfg.data.subgroups, has_combos=any(is_combo(p) for p in data.perturbations))
        cells = PerturbCells.build(data, split, vocab)
        resolved = dataclasses.replace(copy.deepcopy(cfg), model=init_model_config(cfg)).validate()
        n_batches = batches_per_epoch(len(cells.train_rows), cfg.data.batch_size, info.world_size)
        if n_batches == 0:
            raise ValueError(f"data: {len(cells.train_rows)} training cells make no full batch of "
                             f"{cfg.data.batch_size} on each of {info.world_size} ranks")
        if info.rank == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            save_split(split, Path(cfg.run_dir) / SPLIT_FILE)
        split_hash = json.dumps(split.to_dict(), sort_keys=True)
        return Prepared(
            cfg=resolved, vocab_path=vocab_path, vocab_sha256=vocab.sha256,
            tokenisation={"n_bins": resolved.model.n_bins, "max_genes": cfg.data.max_genes,
                          "binning_rule": "log1p(normalize_total 1e4), not binned (GEARS' X)"},
            data_identity={"cells": int(data.X.shape[0]), "genes": int(data.n_genes),
                           "model_genes": int(len(cells.model_cols)), "train_cells": int(len(cells.train_rows)),
                           "split_sha": hashlib.sha256(split_hash.encode()).hexdigest()[:16]},
            batches_per_epoch=n_batches, cells_per_batch=cfg.data.batch_size, fingerprint_keys=DATA_KEYS,
            extra={"cells": cells})

    def build_model(self, cfg: PerturbConfig, ds_config: dict):
        from celljepa_dist.model.pretrained import from_pretrained

        from .model import PerturbModel

        torch.manual_seed(cfg.seed)  # the flag embedding: the same on every rank
        model = PerturbModel(cfg.model)
        model.load_pretrained(from_pretrained(cfg.init, attention_backend=cfg.model.attention_backend,
                                              flash_kernel=cfg.model.flash_kernel))
        return model

    def teacher(self, module, cfg: PerturbConfig) -> TeacherSpec | None:
        from celljepa_dist.model.encoder import CellEncoder

        if cfg.objective != "celljepa":
            return None
        # Built from the just-loaded student: a copy of the pre-trained encoder; EMA momentum 1 keeps it.
        return TeacherSpec(source=module.student, build_like=lambda: CellEncoder(cfg.model))

    def open_loader(self, cfg: PerturbConfig, info, epoch: int, resume_state, prepared: Prepared):
        from .data import open_pair_loader

        return open_pair_loader(prepared.extra["cells"], cfg.data, info.rank, info.world_size, epoch, resume_state)

    def loss_terms(self, cfg: PerturbConfig) -> list[str]:
        from .model import perturb_loss_terms

        return perturb_loss_terms(cfg.loss)

    def losses(self, out, batch: dict, teacher, cfg: PerturbConfig) -> dict[str, torch.Tensor]:
        from .model import perturb_loss, perturbed_teacher_embedding

        teacher_cls = perturbed_teacher_embedding(teacher, batch) if teacher is not None else None
        return perturb_loss(out, batch, cfg.loss, teacher_cls)

    # -- per epoch ---------------------------------------------------------------------------------
    def after_epoch(self, tr) -> dict[str, float]:
        """Collective: every rank predicts a share of the validation cells."""
        from .predict import predict_means

        cells = tr.prepared.extra["cells"]
        val = cells.split.val
        preds = predict_means(tr.engine.module, cells, val, tr.cfg.data, tr.cfg.data.seed, tr.engine.device,
                              tr.float_dtype, tr.info.rank, tr.info.world_size)
        per = evaluate_predictions(cells.data, preds)
        scores = overall(per)
        value = scores[tr.cfg.best_metric]
        epoch = tr.state.epoch
        improved = self.best_value is None or value > self.best_value
        if improved:
            self.best_epoch, self.best_value = epoch, value
            if tr.info.rank == 0:
                save_best(tr.run_dir, tr.engine.module, epoch, tr.state.step, tr.cfg.best_metric, value)
        self.history.append({"epoch": epoch, "step": tr.state.step, **{k: scores[k] for k in
                                                                       ("pearson", "pearson_delta", "mse")}})
        out = {f"val/{k}": v for k, v in scores.items()}
        out["val/best_epoch"] = float(self.best_epoch)
        return out

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, tr) -> None:
        if tr.info.rank != 0:
            return
        results, models = evaluate_run(tr.run_dir, tr.cfg, tr.prepared.extra["cells"], tr.engine.device,
                                       tr.float_dtype, self.best_epoch)
        for method, groups in results.items():
            tr.tracker.log_step(tr.state.step, {f"test/{method}/{g}/{m}": v for g, ms in groups.items()
                                                for m, v in ms.items()})
        tr.tracker.flush()
        for name in ("perturb_metrics.json", "perturb_metrics.md", "perturb_deltas.png", "perturb_split.json"):
            if (tr.run_dir / name).exists():
                tr.tracker.log_artifact(tr.run_dir / name)

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_value": self.best_value, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.best_epoch = state.get("best_epoch")
        self.best_value = state.get("best_value")
        self.history = list(state.get("history", []))


def save_best(run_dir: Path, module, epoch: int, step: int, metric: str, value: float) -> None:
    """The best epoch's full weights (fp32) and what made them best, atomically (rank 0, ZeRO 0-2)."""
    from safetensors.torch import save_file

    d = Path(run_dir) / BEST_DIR
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(d / BEST_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    atomic_write_text(d / BEST_JSON, json.dumps({"epoch": epoch, "step": step, "metric": metric, "value": value}))


def load_best(run_dir: Path, cfg: PerturbConfig):
    from safetensors.torch import load_file

    from .model import PerturbModel

    model = PerturbModel(cfg.model)
    model.load_state_dict(load_file(str(Path(run_dir) / BEST_DIR / BEST_WEIGHTS)))
    return model


def evaluate_run(run_dir: Path, cfg: PerturbConfig, cells, device, float_dtype, best_epoch):
    """The best model and the baselines on the test perturbations; writes the run's report files.
    Returns ({method: {subgroup: {metric}}}, [model method names])."""
    from .baselines import predict_baselines
    from .predict import predict_means
    from .report import DELTAS_PNG, plot_deltas, shown_perturbations, write_metrics

    split, data = cells.split, cells.data
    model = load_best(run_dir, cfg).to(device)
    preds = {cfg.objective: predict_means(model, cells, split.test, cfg.data, cfg.data.seed, device, float_dtype)}
    preds.update(predict_baselines(data, split.train, split.test))
    per_pert = {m: evaluate_predictions(data, p) for m, p in preds.items()}
    results = {m: subgroup_means(pp, split.test_subgroups) for m, pp in per_pert.items()}
    write_metrics(run_dir, results, [cfg.objective])
    atomic_write_text(Path(run_dir) / PER_PERTURBATION_JSON, json.dumps(
        {"best_epoch": best_epoch, "per_perturbation": per_pert}, indent=1, sort_keys=True))
    np.savez_compressed(Path(run_dir) / "perturb_predictions.npz", **{
        f"{m}::{p}": v.astype(np.float32) for m, pp in preds.items() for p, v in pp.items()})
    shown = shown_perturbations(split.test_subgroups)
    truth = {p: data.mean(p) for p in shown}
    plot_deltas(Path(run_dir) / DELTAS_PNG, truth, data.control_mean(),
                {m: preds[m] for m in (cfg.objective, "additive", "mean_shift")}, list(shown), shown)
    return results, [cfg.objective]
