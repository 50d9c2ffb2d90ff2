"""Pre-training as a task of the training loop: shards in, CellJEPA (student + heads) out, the
masked-value + JEPA (+ GEPC, ECS, VICReg) loss of `model.cell_jepa.celljepa_loss`."""
from __future__ import annotations

from pathlib import Path

import torch

from celljepa_dist.config import TrainConfig, resolve_for_run
from celljepa_dist.model import CellJEPA, celljepa_loss, teacher_embedding
from celljepa_dist.model.encoder import CellEncoder
from celljepa_dist.train.task import Prepared, TaskBase, TeacherSpec

# Data keys of the config that define what the model sees (the rest are performance knobs).
PRETRAIN_DATA_KEYS = ("data.batch_size", "data.max_genes", "data.mask_ratio", "data.seed", "data.known_first")


def resolve_vocab_path(cfg: TrainConfig) -> Path:
    if cfg.vocab:
        return Path(cfg.vocab)
    guess = Path(cfg.data.shards_dir).parent / "vocab.json"
    if not guess.exists():
        raise FileNotFoundError(f"vocab: not set and {guess} does not exist (set `vocab:` in the config)")
    return guess


def pretrain_loss_terms(loss_cfg) -> list[str]:
    """The loss terms a run computes, logs and checks for NaN (keys of celljepa_loss's dict)."""
    terms = ["loss", "loss_rec"]
    terms += ["loss_jepa"] if loss_cfg.objective == "celljepa" else []
    terms += ["loss_mvc"] if loss_cfg.gepc_weight > 0 else []
    terms += ["loss_ecs"] if loss_cfg.w_ecs > 0 else []
    terms += ["loss_var"] if loss_cfg.w_var > 0 else []
    terms += ["loss_cov"] if loss_cfg.w_cov > 0 else []
    return terms


def build_celljepa(cfg: TrainConfig, ds_config: dict) -> CellJEPA:
    """Fresh weights from cfg.seed (the same on every rank); partitioned at birth under ZeRO-3."""
    torch.manual_seed(cfg.seed)
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return CellJEPA(cfg.model)
    return CellJEPA(cfg.model)


class PretrainTask(TaskBase):
    name = "pretrain"

    def prepare(self, cfg: TrainConfig, info) -> Prepared:
        from celljepa_dist.data.shards import read_manifest
        from celljepa_dist.data.stream import build_loader
        from celljepa_dist.data.vocab import GeneVocab

        vocab_path = resolve_vocab_path(cfg)
        vocab = GeneVocab.load(vocab_path)
        manifest = read_manifest(cfg.data.shards_dir)
        # Values only the run knows, resolved once (vocab size, the GEPC head, n_bins vs the shards).
        cfg = resolve_for_run(cfg, vocab_size=len(vocab), manifest_n_bins=manifest["binning"]["n_bins"])
        plan, _ = build_loader(cfg.data, info.rank, info.world_size, epoch=0, vocab_sha256=vocab.sha256)
        return Prepared(
            cfg=cfg, vocab_path=vocab_path, vocab_sha256=vocab.sha256,
            tokenisation={"n_bins": manifest["binning"]["n_bins"], "max_genes": cfg.data.max_genes,
                          "binning_rule": manifest["binning"]["rule"]},
            data_identity={"total_cells": manifest["total_cells"]},
            batches_per_epoch=plan.epoch_batches, cells_per_batch=cfg.data.batch_size,
            fingerprint_keys=PRETRAIN_DATA_KEYS)

    def build_model(self, cfg: TrainConfig, ds_config: dict) -> CellJEPA:
        return build_celljepa(cfg, ds_config)

    def teacher(self, module: CellJEPA, cfg: TrainConfig) -> TeacherSpec | None:
        if cfg.objective != "celljepa":
            return None
        return TeacherSpec(source=module.student, build_like=lambda: CellEncoder(cfg.model))

    def open_loader(self, cfg: TrainConfig, info, epoch: int, resume_state: dict | None, prepared: Prepared):
        from celljepa_dist.data.stream import build_loader

        loader, _ = build_loader(cfg.data, info.rank, info.world_size, epoch=epoch, resume_state=resume_state,
                                 vocab_sha256=prepared.vocab_sha256)
        return loader

    def loss_terms(self, cfg: TrainConfig) -> list[str]:
        return pretrain_loss_terms(cfg.loss)

    def losses(self, out, batch: dict, teacher, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        teacher_cls = teacher_embedding(teacher, batch) if teacher is not None else None
        return celljepa_loss(out, batch, cfg.loss, teacher_cls)

    def flop_params(self, module: CellJEPA) -> int:
        from celljepa_dist.train.loop import count_nonembedding_params

        # The student's side of the FLOP count: encoder, value head, predictor (the MVC head's
        # per-token inner products are negligible).
        return sum(count_nonembedding_params(m) for m in (module.student, module.predictor, module.value_head))
