"""The pre-training step and loop. No argparse here: `launch/pretrain.py` builds the config.

One optimiser step = `gradient_accumulation_steps` micro-batches on every rank. Randomness that
the model draws (dropout) is re-seeded before every micro-batch from a pure function of
(seed, step, micro-batch, rank), so a resumed run replays exactly what an uninterrupted run does.
"""
from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.config import TrainConfig, flatten, save_config
from celljepa_dist.model import CellJEPA, celljepa_loss, momentum_at, teacher_embedding
from celljepa_dist.model.encoder import CellEncoder
from celljepa_dist.tracking import default_run_name, git_sha, make_tracker
from celljepa_dist.train.checkpoint import CheckpointManager, ResumeError, committed_checkpoints, resolve_resume
from celljepa_dist.train.engine import build_ds_config, init_distributed, initialize_engine
from celljepa_dist.train.health_probe import HEALTH_LOG, HealthMonitor
from celljepa_dist.train.teacher import Teacher

LOSS_LOG = "losses.jsonl"
PROGRESS_FILE = "progress.json"


class NonFiniteError(RuntimeError):
    pass


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed for the dropout of one micro-batch: a pure function, so resumes replay it."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def flops_per_token(n_nonembed_params: int, n_layers: int, d_model: int, seq_len: int, with_teacher: bool) -> float:
    """6N (student fwd+bwd) + 2N (teacher fwd) + attention (QK^T and AV: 4*L*d per layer, x3 fwd+bwd)."""
    passes = 3 + (1 if with_teacher else 0)
    return (6 + (2 if with_teacher else 0)) * n_nonembed_params + passes * 4 * n_layers * seq_len * d_model


def count_nonembedding_params(module: torch.nn.Module) -> int:
    embed = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if id(p) not in embed)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    checkpoints: list[Path] = field(default_factory=list)
    mlflow_run_id: str | None = None


def _resolve_vocab(cfg: TrainConfig) -> Path:
    if cfg.vocab:
        return Path(cfg.vocab)
    guess = Path(cfg.data.shards_dir).parent / "vocab.json"
    if not guess.exists():
        raise FileNotFoundError(f"vocab: not set and {guess} does not exist (set `vocab:` in the config)")
    return guess


def loss_terms(loss_cfg) -> list[str]:
    """The loss terms a run computes, logs and checks for NaN (keys of celljepa_loss's dict)."""
    terms = ["loss", "loss_rec"]
    terms += ["loss_jepa"] if loss_cfg.objective == "celljepa" else []
    terms += ["loss_mvc"] if loss_cfg.gepc_weight > 0 else []
    terms += ["loss_ecs"] if loss_cfg.w_ecs > 0 else []
    terms += ["loss_var"] if loss_cfg.w_var > 0 else []
    terms += ["loss_cov"] if loss_cfg.w_cov > 0 else []
    return terms


def _tokenisation(cfg: TrainConfig) -> dict:
    """How the training cells were tokenised (recorded with the model so that embedding shows new
    cells the same way). The model's value range must be the shards' binning."""
    from celljepa_dist.data.shards import read_manifest

    binning = read_manifest(cfg.data.shards_dir)["binning"]
    if binning["n_bins"] != cfg.model.n_bins:
        raise ValueError(f"{Path(cfg.data.shards_dir) / 'manifest.json'}: shards binned with n_bins="
                         f"{binning['n_bins']} but model.n_bins={cfg.model.n_bins}; set model.n_bins to match")
    return {"n_bins": binning["n_bins"], "max_genes": cfg.data.max_genes, "binning_rule": binning["rule"]}


def _build_model(cfg: TrainConfig, ds_config: dict) -> CellJEPA:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return CellJEPA(cfg.model)
    return CellJEPA(cfg.model)


def _to_device(batch: dict, device, float_dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            continue
        v = v.to(device, non_blocking=True)
        out[k] = v.to(float_dtype) if k == "values" and v.is_floating_point() else v
    return out


class _LossLog:
    """Per-step losses of rank 0 in `run_dir/losses.jsonl`, flushed with checkpoint commits."""

    def __init__(self, path: Path, resumed_step: int):
        self.path, self.pending = path, []
        if path.exists():  # drop steps past the checkpoint: they will be recomputed identically
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resumed_step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    def add(self, record: dict) -> None:
        self.pending.append(record)

    def flush(self) -> None:
        if self.pending:
            old = self.path.read_text() if self.path.exists() else ""
            atomic_write_text(self.path, old + "".join(json.dumps(r) + "\n" for r in self.pending))
            self.pending = []


def run(cfg: TrainConfig) -> RunResult:
    """Train per `cfg` on the process group of the launcher; returns where things are (all ranks)."""
    from celljepa_dist.data.stream import build_loader
    from celljepa_dist.data.vocab import GeneVocab

    cfg.validate()
    info = init_distributed(cfg)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        # Its NaN-filling of every fresh allocation costs ~20x on CPU and changes no result.
        torch.utils.deterministic.fill_uninitialized_memory = False
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = _resolve_vocab(cfg)
    vocab = GeneVocab.load(vocab_path)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = len(vocab)
    if cfg.loss.gepc_weight > 0:
        cfg.model.use_mvc = True  # the GEPC head exists exactly when its loss is on (scgpt by default)
    cfg.model.validate()
    terms_logged = loss_terms(cfg.loss)
    tokenisation = _tokenisation(cfg)

    ga = cfg.deepspeed.gradient_accumulation_steps
    probe, _ = build_loader(cfg.data, info.rank, info.world_size, epoch=0, vocab_sha256=vocab.sha256)
    batches_per_epoch = probe.epoch_batches
    del probe
    steps_per_epoch = batches_per_epoch // ga
    if steps_per_epoch == 0:
        raise ValueError(f"data: {batches_per_epoch} batches per rank < gradient_accumulation_steps={ga}")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    # The probe cells (None when health is off); a bad probe fails here, before any engine starts.
    health = HealthMonitor.from_config(cfg, vocab.sha256, vocab_path, total_steps, info.rank)

    ds_config = build_ds_config(cfg, info.world_size)
    model = _build_model(cfg, ds_config)
    n_nonembed = count_nonembedding_params(model.student) + count_nonembedding_params(model.predictor) \
        + count_nonembedding_params(model.value_head)
    engine, _, _ = initialize_engine(cfg, model, ds_config, steps_per_epoch)
    float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    teacher = None
    if cfg.objective == "celljepa":
        teacher = Teacher(engine.module.student, cfg.deepspeed.zero_stage, lambda: CellEncoder(cfg.model),
                          ds_config, info.rank, forward_dtype=float_dtype)

    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last, info.rank, info.world_size)
    resume_dir = resolve_resume(ckpt.root, cfg.checkpoint.resume)
    if resume_dir is None and committed_checkpoints(ckpt.root):
        # A fresh start here would prune and overwrite another run's checkpoints.
        raise ResumeError(f"{run_dir} already holds committed checkpoints: pass --resume auto to continue "
                          "it, or choose a new run_dir")
    ckpt.clean_uncommitted()
    step, epoch, batches_done, loader_state = 0, 0, 0, None
    if resume_dir is not None:
        train_state, rank_state = ckpt.load(resume_dir, engine, teacher)
        step, epoch, batches_done = train_state["step"], train_state["epoch"], train_state["batches_done"]
        loader_state = rank_state["loader"]
        if info.rank == 0:
            print(f"resumed from {resume_dir} at step {step} (epoch {epoch}, batch {batches_done})", flush=True)

    tracker = make_tracker(cfg.tracking, run_dir, info.rank,
                           tags={"git_sha": git_sha(), "world_size": str(info.world_size),
                                 "objective": cfg.objective, "zero_stage": str(cfg.deepspeed.zero_stage)},
                           resume=resume_dir is not None,
                           run_name=default_run_name(cfg.objective, cfg.model.d_model, cfg.model.n_layers, run_dir.name))
    if info.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_text(run_dir / "ds_config.json", json.dumps(ds_config, indent=2))
        if resume_dir is None:
            shutil.copyfile(vocab_path, run_dir / "vocab.json")
            tracker.log_params(flatten(cfg))
            for name in ("config.yaml", "ds_config.json", "vocab.json"):
                tracker.log_artifact(run_dir / name)
    losslog = _LossLog(run_dir / LOSS_LOG, step) if info.rank == 0 else None
    last_logged = tracker.last_logged_step()
    healthlog = _LossLog(run_dir / HEALTH_LOG, step) if info.rank == 0 and health is not None else None
    if health is not None:
        health.attach(tracker, healthlog)

    committed: list[Path] = []
    progress = None
    if info.rank == 0 and cfg.tracking.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=f"pretrain {cfg.objective}", dynamic_ncols=True)

    def commit(at_step: int) -> None:
        tracker.flush()  # before the marker: a kill in between re-logs nothing (see MlflowTracker)
        for log in (losslog, healthlog):
            if log is not None:
                log.flush()
        d = ckpt.save(at_step, engine, teacher,
                      {"step": at_step, "epoch": epoch, "batches_done": batches_done,
                       "ema_step": at_step, "total_steps": total_steps,
                       # What an offline export needs (celljepa_dist/export.py): no DeepSpeed, no YAML.
                       "objective": cfg.objective, "zero_stage": cfg.deepspeed.zero_stage,
                       "model": cfg.model.to_dict(), "vocab_sha256": vocab.sha256, "data": tokenisation},
                      {"loader": loader.state_dict(consumed) if batches_done else None})
        committed.append(d)

    last_saved = step if resume_dir is not None else -1
    try:
        batches_per_epoch_used = steps_per_epoch * ga  # a ragged tail of < ga batches is not used
        while step < total_steps:
            loader, _ = build_loader(cfg.data, info.rank, info.world_size, epoch=epoch,
                                     resume_state=loader_state if batches_done else None, vocab_sha256=vocab.sha256)
            consumed, loader_state = 0, None
            sums = torch.zeros(len(terms_logged) + 1, dtype=torch.float64)  # loss terms, tokens over the window
            t_step = time.perf_counter()
            for batch in loader:
                micro = batches_done % ga
                torch.manual_seed(step_seed(cfg.seed, step, micro, info.rank))
                batch = _to_device(batch, engine.device, float_dtype)
                out = engine(batch)
                teacher_cls = teacher_embedding(teacher, batch) if teacher is not None else None
                losses = celljepa_loss(out, batch, cfg.loss, teacher_cls)
                terms = torch.stack([losses[t].detach().double().cpu() for t in terms_logged]
                                    + [torch.tensor(float(batch["lengths"].sum()), dtype=torch.float64)])
                if dist.is_initialized():
                    dist.all_reduce(terms)  # NaN on any rank -> NaN on all: every rank decides alike
                bad_terms = [n for n, v in zip(terms_logged, terms[:-1]) if not math.isfinite(v)]
                if bad_terms and cfg.nonfinite_policy == "stop":
                    raise NonFiniteError(
                        f"non-finite {', '.join(bad_terms)} at step {step} (epoch {epoch}, batch {batches_done}); "
                        f"stopped before the optimiser step; last committed checkpoint: "
                        f"{committed[-1] if committed else resume_dir}")
                sums += terms
                engine.backward(losses["loss"])
                batches_done += 1
                consumed += 1
                if micro != ga - 1:
                    engine.step()  # DeepSpeed counts micro-steps; no optimiser step here
                    continue

                grad_norm = _check_grads_before_step(engine, cfg, step)
                skipped_before = engine.skipped_steps
                engine.step()
                applied = engine.skipped_steps == skipped_before
                if grad_norm is None:
                    grad_norm = engine.get_global_grad_norm()
                if not applied and cfg.nonfinite_policy == "stop":
                    raise NonFiniteError(
                        f"non-finite gradient norm at step {step}: DeepSpeed skipped the optimiser step; "
                        f"stopped; last committed checkpoint: {committed[-1] if committed else resume_dir}")
                momentum = momentum_at(step, total_steps, cfg.ema.schedule, cfg.ema.base, cfg.ema.final)
                if teacher is not None and applied:
                    teacher.update(momentum)
                step += 1

                elapsed = time.perf_counter() - t_step
                cells = cfg.data.batch_size * ga * info.world_size
                tokens = float(sums[-1])
                mean = sums[:-1] / (ga * info.world_size)
                record = {"step": step, "epoch": epoch, **{t: float(v) for t, v in zip(terms_logged, mean)}}
                metrics = {**{k: v for k, v in record.items() if k.startswith("loss")},
                           "lr": engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                           "cells_per_s": cells / elapsed, "tokens_per_s": tokens / elapsed,
                           "memory_mb": peak_memory_mb(), "step_applied": float(applied)}
                if teacher is not None:
                    metrics["ema_momentum"] = momentum
                if cfg.tracking.peak_tflops > 0:
                    seq_len = batch["gene_ids"].shape[1]
                    fpt = flops_per_token(n_nonembed, cfg.model.n_layers, cfg.model.d_model, seq_len, teacher is not None)
                    metrics["mfu"] = fpt * tokens / elapsed / (cfg.tracking.peak_tflops * 1e12 * info.world_size)
                if losslog is not None:
                    losslog.add(record)
                    # Heartbeat for watchdogs (and the kill test): where the run is right now.
                    atomic_write_text(run_dir / PROGRESS_FILE, json.dumps({"step": step, "epoch": epoch}), fsync=False)
                if step % cfg.tracking.log_every == 0 and step > last_logged:
                    tracker.log_step(step, metrics)
                if health is not None:  # every rank: collective forwards under ZeRO-3
                    health.after_step(step, engine.module, teacher, engine.device, float_dtype)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", cells_s=f"{metrics['cells_per_s']:.0f}")
                sums.zero_()
                if batches_done >= batches_per_epoch_used:
                    epoch, batches_done = epoch + 1, 0
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    commit(step)
                    last_saved = step
                t_step = time.perf_counter()
                if step >= total_steps or batches_done == 0:
                    break  # done, or the epoch ended: the next loader starts the next epoch
            else:
                raise RuntimeError(f"epoch {epoch}: the loader stopped after {batches_done} batches, "
                                   f"expected {batches_per_epoch_used}")
        if last_saved != step:
            commit(step)
    except BaseException:
        tracker.drop_pending()  # metrics past the last commit will be recomputed by a resume
        tracker.finish("FAILED")
        raise
    finally:
        if progress is not None:
            progress.close()
    if info.rank == 0:
        _summarise_run(tracker, run_dir)
    tracker.finish("FINISHED")
    return RunResult(run_dir=run_dir, final_step=step, checkpoints=committed, mlflow_run_id=tracker.run_id)


def _summarise_run(tracker, run_dir: Path) -> None:
    """What the runs table and the run page show of a finished run: `final/<loss>` columns,
    the loss-curve PNG (`run_dir/loss_curves.png`) and the health PNG (`run_dir/health.png`),
    both also artefacts of the run."""
    from celljepa_dist.train.report import plot_loss_curves, plot_run_health, read_losses

    health_png = plot_run_health(run_dir)  # run_dir/health.png, when the run measured health
    if health_png is not None:
        tracker.log_artifact(health_png)
    losses = read_losses(run_dir)
    if not losses:
        return
    tracker.log_final({k: v for k, v in losses[-1].items() if k.startswith("loss")})
    tracker.log_artifact(plot_loss_curves({run_dir.name: run_dir}, run_dir / "loss_curves.png"))


def _check_grads_before_step(engine, cfg: TrainConfig, step: int) -> float | None:
    """ZeRO-0 applies any gradient: check it here. ZeRO 1-3 check and skip the step themselves."""
    if cfg.deepspeed.zero_stage != 0:
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    if not math.isfinite(norm):
        raise NonFiniteError(f"non-finite gradient norm ({norm}) at step {step}; stopped before the optimiser step")
    return norm
