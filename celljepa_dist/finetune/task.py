"""Finetuning as a task of the shared training loop (train/loop.py, train/task.py): a labelled h5ad
in, the pre-trained CellJEPA (`init`) out, finetuned with GEP + GEPC + ECS (+ JEPA) (paper 2.4).

The loop gives it everything pre-training has (DeepSpeed engine, EMA teacher, committed
checkpoints with exact resume, MLflow, lr x decay per epoch); this module says what differs:

  prepare       init checks, h5ad -> tokens, the stratified split (RUN_DIR/split.csv), the
                resolved config (the init's architecture and vocab, the inherited JEPA weight)
  build_model   the init's student and heads (+ a fresh GEPC head when the init has none)
  init_teacher  the init's EMA teacher (celljepa); it keeps its EMA from there
  open_loader   the training cells of one epoch (finetune/data.py), with their labels
  losses        celljepa_loss: GEP, GEPC, ECS (supcon with labels, or scGPT's), JEPA
  after_epoch   validation GEP/GEPC/JEPA losses (labels never used: no ECS on validation cells)
  finish        rank 0: export RUN_DIR/model, embed validation and all cells, AvgBIO beside PCA,
                UMAP PNGs, MLflow (finetune/evaluate.py)
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.finetune.config import FinetuneConfig, finetune_model_config
from celljepa_dist.finetune.data import (
    LabelledCells,
    Masking,
    data_fingerprint,
    make_batch,
    open_train_loader,
    read_h5ad,
    read_labelled,
    unknown_labels,
    validation_batches,
)
from celljepa_dist.finetune.init import (
    InitModel,
    load_student_weights,
    load_teacher_weights,
    parent_run,
    pretrain_w_jepa,
    read_init,
)
from celljepa_dist.finetune.split import (
    SPLIT_FILE,
    Split,
    check_label_counts,
    check_saved_split,
    stratified_split,
    write_split,
)
from celljepa_dist.model import CellJEPA, teacher_embedding
from celljepa_dist.train.pretrain_task import PretrainTask
from celljepa_dist.train.task import Prepared

# Data keys that change what the model sees (the config fingerprint; a resume must keep them).
FINETUNE_DATA_KEYS = ("data.batch_size", "data.max_genes", "data.mask_ratio", "data.seed", "data.known_first",
                      "data.label_key", "data.val_fraction", "data.split_seed", "inherit_w_jepa")
RESULT_FILE = "finetune_result.json"
VAL_MASK_EPOCH = 0  # validation masks: the same cells and genes every epoch, so epochs compare


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_w_jepa(cfg: FinetuneConfig, init: InitModel) -> float:
    """Paper E.2: the JEPA weight of the init's pre-training run (unless inherit_w_jepa is off)."""
    if not cfg.inherit_w_jepa or cfg.objective != "celljepa":
        return cfg.loss.w_jepa
    w = pretrain_w_jepa(init)
    if w is None:
        raise ValueError(f"init {init.directory}: cannot find the JEPA weight it was pre-trained with (no "
                         "train_state.json of its source checkpoint, no config.yaml in its run dir); set "
                         "inherit_w_jepa=false and loss.w_jepa explicitly")
    return w


class FinetuneTask(PretrainTask):
    """Pre-training's teacher, loss terms, losses and FLOP count (inherited); its own data,
    weights, validation and end of run."""

    name = "finetune"

    def __init__(self):
        self.init: InitModel | None = None
        self.adata = None
        self.labelled: LabelledCells | None = None
        self.split: Split | None = None
        self.masking: Masking | None = None
        self.fingerprint = ""
        self._parent_tagged = False

    # -- setup ------------------------------------------------------------------------------
    def prepare(self, cfg: FinetuneConfig, info) -> Prepared:
        from celljepa_dist.data.order import rank_plan

        if not isinstance(cfg, FinetuneConfig):
            raise TypeError(f"FinetuneTask needs a FinetuneConfig (finetune/config.py), got {type(cfg).__name__}")
        init = read_init(cfg.init, cfg.objective, cfg.vocab)
        where = str(cfg.data.h5ad)
        adata = read_h5ad(cfg.data.h5ad)
        labelled = read_labelled(adata, init.vocab, init.n_bins, cfg.data.label_key, cfg.data.gene_key,
                                 cfg.data.layer, cfg.data.min_vocab_fraction, where)
        check_label_counts(labelled.codes, labelled.names, cfg.data.label_key, where)
        split = stratified_split(labelled.codes, cfg.data.val_fraction, cfg.data.split_seed)
        if info.rank == 0:
            path = Path(cfg.run_dir) / SPLIT_FILE
            if path.exists():
                check_saved_split(path, split, labelled.obs_names, labelled.labels)
            else:
                write_split(path, split, labelled.obs_names, labelled.labels)

        max_genes = cfg.data.max_genes or init.max_genes
        resolved = dataclasses.replace(
            copy.deepcopy(cfg), vocab=str(init.vocab_path),
            model=finetune_model_config(cfg, init.model, len(init.vocab)),
            loss=dataclasses.replace(cfg.loss, w_jepa=resolve_w_jepa(cfg, init)),
            data=dataclasses.replace(cfg.data, max_genes=max_genes)).validate()
        train_codes = labelled.codes[split.train]
        self.init, self.adata, self.labelled, self.split = init, adata, labelled, split
        self.masking = Masking(cfg.data.batch_size, max_genes, cfg.data.mask_ratio, resolved.data.seed,
                               cfg.data.known_first)
        self.fingerprint = data_fingerprint(labelled.cells, split.train, train_codes)
        plan = rank_plan(len(split.train), cfg.data.batch_size, info.world_size, info.rank)
        if plan.num_batches == 0:
            raise ValueError(f"{where}: {len(split.train)} training cells cannot fill one batch of "
                             f"{cfg.data.batch_size} on each of {info.world_size} ranks (lower data.batch_size)")
        if info.rank == 0:
            print(f"finetune: {len(labelled)} cells of {where} ({len(labelled.names)} labels in obs"
                  f"[{cfg.data.label_key!r}]), {len(split.train)} train / {len(split.val)} validation; "
                  f"{labelled.genes.describe()}; init {init.directory} (w_jepa={resolved.loss.w_jepa:g})", flush=True)
        return Prepared(
            cfg=resolved, vocab_path=init.vocab_path, vocab_sha256=init.vocab.sha256,
            tokenisation={"n_bins": init.n_bins, "max_genes": max_genes, "binning_rule": init.binning_rule},
            data_identity={"total_cells": len(split.train), "h5ad_cells": len(labelled), "cells_sha": self.fingerprint,
                           "init_sha256": file_sha256(init.directory / "model.safetensors")},
            batches_per_epoch=plan.num_batches, cells_per_batch=cfg.data.batch_size,
            fingerprint_keys=FINETUNE_DATA_KEYS)

    def build_model(self, cfg: FinetuneConfig, ds_config: dict) -> CellJEPA:
        """The init's weights on every rank; a GEPC head the init lacks starts from cfg.seed.
        (Under ZeRO-3 DeepSpeed partitions the loaded module at initialize.)"""
        torch.manual_seed(cfg.seed)
        model = CellJEPA(cfg.model)
        load_student_weights(model, self.init)
        return model

    def init_teacher(self, teacher) -> None:
        """The pre-trained EMA teacher, not a copy of the student: JEPA continues where
        pre-training left it (every rank; collective under ZeRO-3)."""
        if teacher.zero_stage == 3:
            import deepspeed

            params = list(teacher.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if teacher.rank == 0:
                    load_teacher_weights(teacher.module, self.init)
        else:
            load_teacher_weights(teacher.module, self.init)

    # -- the epoch ----------------------------------------------------------------------------
    def open_loader(self, cfg: FinetuneConfig, info, epoch: int, resume_state: dict | None, prepared: Prepared):
        rows = self.split.train
        return open_train_loader(self.labelled.cells, rows, self.labelled.codes[rows], self.masking, epoch,
                                 info.rank, info.world_size, self.fingerprint, resume_state)

    @torch.no_grad()
    def after_epoch(self, tr) -> dict[str, float]:
        """Validation GEP, GEPC and JEPA losses (same masks every epoch). Collective: every rank
        runs the same number of equally shaped forwards (validation_batches)."""
        from celljepa_dist.train.loop import _to_device

        self._tag_parent(tr)
        module = tr.engine.module
        was_training = module.training
        module.eval()
        sums = torch.zeros(6, dtype=torch.float64)  # rec sse, mvc sse, masked tokens, jepa sum, cells
        try:
            for rows, real in validation_batches(self.split.val, self.masking.batch_size, tr.info.rank,
                                                 tr.info.world_size):
                batch = make_batch(self.labelled.cells, rows, unknown_labels(len(rows)), self.masking, VAL_MASK_EPOCH)
                batch = _to_device(batch, tr.engine.device, tr.float_dtype)
                out = module(batch)
                sums += validation_sums(out, batch, torch.from_numpy(real).to(batch["value_mask"].device),
                                        tr.teacher)
        finally:
            module.train(was_training)
        if dist.is_initialized():
            dist.all_reduce(sums)
        metrics = {"val/loss_rec": float(sums[0] / sums[2].clamp(min=1))}
        if module.mvc_head is not None:
            metrics["val/loss_mvc"] = float(sums[1] / sums[2].clamp(min=1))
        if tr.teacher is not None:
            metrics["val/loss_jepa"] = float(sums[3] / sums[4].clamp(min=1))
        return metrics

    # -- the end ------------------------------------------------------------------------------
    def finish(self, tr) -> None:
        """Rank 0: RUN_DIR/model from the last commit, then (eval.enabled) embeddings, AvgBIO on
        validation and all cells beside PCA, UMAPs, MLflow; RUN_DIR/finetune_result.json."""
        if tr.info.rank != 0:
            return
        from celljepa_dist.export import MODEL_DIR_NAME, export_checkpoint
        from celljepa_dist.finetune.evaluate import embed_all, evaluate_finetuned

        self._tag_parent(tr)
        cfg = tr.cfg
        last = tr.last_commit()
        model_dir = tr.run_dir / MODEL_DIR_NAME
        export_checkpoint(last, model_dir)
        result = {"model": str(model_dir), "checkpoint": str(last), "init": str(self.init.directory),
                  "mlflow_run_id": tr.tracker.run_id, "parent_run": parent_run(self.init),
                  "train_cells": int(len(self.split.train)), "val_cells": int(len(self.split.val))}
        if cfg.eval.enabled:
            embeddings = embed_all(self.adata, model_dir, self.init.directory, self.init.has_teacher and
                                   tr.teacher is not None, cfg.data, cfg.eval.batch_size)
            split_of_row = self.split.assignment(len(self.labelled))
            ev = evaluate_finetuned(self.adata, split_of_row, embeddings, cfg.data.label_key, tr.run_dir,
                                    Path(cfg.data.h5ad).stem, tr.tracker.run_id, getattr(tr.tracker, "uri", None))
            result["avgbio"] = {split: {key: scores["avgbio"] for key, scores in ev.results[split].items()}
                                for split in ev.results}
            result["embedded"] = str(ev.embedded)
            result["reports"] = {split: {k: str(p) for k, p in files.items()} for split, files in ev.files.items()}
        atomic_write_text(tr.run_dir / RESULT_FILE, json.dumps(result, indent=2))

    def _tag_parent(self, tr) -> None:
        """The pre-training run in the finetuning run's MLflow tags (rank 0, once)."""
        client = getattr(tr.tracker, "client", None)
        parent = parent_run(self.init)
        if self._parent_tagged or client is None or parent is None:
            return
        client.set_tag(tr.tracker.run_id, "parent_run_id", parent["run_id"])
        client.set_tag(tr.tracker.run_id, "parent_tracking_uri", parent["tracking_uri"])
        if parent["tracking_uri"] == tr.tracker.uri:  # MLflow nests runs of one store only
            client.set_tag(tr.tracker.run_id, "mlflow.parentRunId", parent["run_id"])
        self._parent_tagged = True


def validation_sums(out, batch: dict, real: torch.Tensor, teacher) -> torch.Tensor:
    """[rec sse, mvc sse, masked tokens, jepa sum, cells, 0] over the real cells of one batch."""
    mask = batch["value_mask"]
    token_real = real[:, None].expand_as(mask)[mask].double()  # per masked token, in pred order
    target = batch["target_values"][mask].double()
    rec = ((out.pred_values.double() - target) ** 2 * token_real).sum()
    mvc = ((out.mvc_pred.double() - target) ** 2 * token_real).sum() if out.mvc_pred is not None else rec * 0
    jepa = torch.zeros((), dtype=torch.float64)
    if teacher is not None:
        target_cls = teacher_embedding(teacher, batch)
        cos = torch.nn.functional.cosine_similarity(out.jepa_pred.float(), target_cls.float(), dim=-1)
        jepa = ((1.0 - cos).double() * real.double()).sum()
    return torch.stack([rec.cpu(), mvc.cpu(), token_real.sum().cpu(), jepa.cpu(),
                        real.double().sum().cpu(), torch.zeros((), dtype=torch.float64)])

