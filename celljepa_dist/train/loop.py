"""The training step and loop of every task. No argparse here: the launchers build the config.

`setup` builds everything once (a `Trainer`), `train_step` is one optimiser step, `commit`
checkpoints; `run` strings them together. What differs between pre-training, finetuning and
perturbation training (config resolution, model, data, losses, per-epoch validation, the run's
products) is a `Task` (train/task.py); pre-training is `PretrainTask` (train/pretrain_task.py).

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.config import TrainConfig, flatten, save_config
from celljepa_dist.cpu_features import emulated_bf16_warning
from celljepa_dist.model import momentum_at
from celljepa_dist.tracking import default_run_name, finish_failed, git_sha, make_tracker
from celljepa_dist.train.checkpoint import (
    CheckpointManager,
    ResumeError,
    committed_checkpoints,
    resolve_verified_resume,
)
from celljepa_dist.train.collectives import collective_timeout, enter_training, explain_failure
from celljepa_dist.train.engine import DistInfo, build_ds_config, init_distributed, initialize_engine
from celljepa_dist.train.health_probe import HEALTH_LOG, HealthMonitor
from celljepa_dist.train.heartbeat import beat, start_heartbeat
from celljepa_dist.train.interrupts import end_status, shielded
from celljepa_dist.train.interrupts import install as install_interrupts
from celljepa_dist.train.launcher_watch import watch_launcher
from celljepa_dist.train.pretrain_task import PretrainTask
from celljepa_dist.train.run_lock import lock_run_dir
from celljepa_dist.train.state import (
    TrainState,
    config_fingerprint,
    describe_differences,
    fingerprint_differences,
    planned_total_steps,
    shape_change_refusal,
)
from celljepa_dist.train.task import Prepared, Task
from celljepa_dist.train.teacher import Teacher

LOSS_LOG = "losses.jsonl"
PROGRESS_FILE = "progress.json"


class NonFiniteError(RuntimeError):
    pass


def step_label(steps_done: int) -> str:
    """The step being computed as errors name it: numbered as losses.jsonl and MLflow number it
    (1-based, `steps_done + 1`), so the error and the log agree."""
    return f"step {steps_done + 1} (numbered as in {LOSS_LOG})"


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


@dataclass
class Trainer:
    """Everything a run sets up once (`setup`), around which `train_step` and `commit` work: the
    torchtitan split of setup, step and checkpoint. The state that survives a restart is
    `state` (global, train_state.json), the engine and teacher weights, and per rank the RNG and
    the loader position (`rank_state`)."""

    cfg: TrainConfig
    task: Task
    prepared: Prepared
    info: DistInfo
    run_dir: Path
    terms: list[str]  # loss terms computed, logged and NaN-checked (task.loss_terms)
    steps_per_epoch: int
    engine: Any
    teacher: Teacher | None
    float_dtype: torch.dtype
    n_nonembed: int
    ckpt: CheckpointManager
    state: TrainState
    resume_dir: Path | None
    tracker: Any
    health: HealthMonitor | None
    losslog: "_LossLog | None"
    healthlog: "_LossLog | None"
    last_logged: int  # highest step already in the MLflow run (a resume logs nothing twice)
    resumed_loader_state: dict | None = None  # mid-epoch position, for the first loader only
    loader: Any = None  # the current epoch's loader and how many batches this process took from it
    consumed: int = 0
    progress: Any = None
    committed: list[Path] = field(default_factory=list)

    @property
    def grad_accum(self) -> int:
        return self.cfg.deepspeed.gradient_accumulation_steps

    @property
    def batches_per_epoch_used(self) -> int:
        return self.steps_per_epoch * self.grad_accum  # a ragged tail of < ga batches is not used

    def last_commit(self):
        return self.committed[-1] if self.committed else self.resume_dir

    @property
    def vocab_sha256(self) -> str:
        return self.prepared.vocab_sha256

    def rank_state(self) -> dict:
        return {"loader": self.loader.state_dict(self.consumed) if self.state.batches_done else None}


def setup(cfg: TrainConfig, task: Task | None = None) -> Trainer:
    """Process group, the task's data and model, engine, teacher, checkpoints (resume), tracking,
    health probe. `task` defaults to pre-training."""
    task = task or PretrainTask()
    cfg.validate()
    # Process-level faults (docs/training.md, "Faults"): signals end a rank as exceptions, a rank whose
    # launcher died stops, one job per run_dir (before anything is written there), heartbeats.
    install_interrupts()
    watch_launcher()
    info = init_distributed(cfg)
    lock_run_dir(cfg.run_dir, info.rank)
    start_heartbeat(cfg.run_dir, info.rank, cfg.distributed.heartbeat_s)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        # Its NaN-filling of every fresh allocation costs ~20x on CPU and changes no result.
        torch.utils.deterministic.fill_uninitialized_memory = False
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = task.prepare(cfg, info)
    cfg = prepared.cfg

    ga = cfg.deepspeed.gradient_accumulation_steps
    steps_per_epoch = prepared.batches_per_epoch // ga
    if steps_per_epoch == 0:
        raise ValueError(f"data: {prepared.batches_per_epoch} batches per rank < gradient_accumulation_steps={ga}")
    total_steps, short = planned_total_steps(steps_per_epoch, cfg.epochs, cfg.max_steps)
    if short and info.rank == 0:
        print(f"WARNING: {short}", flush=True)
    slow_bf16 = emulated_bf16_warning(cfg.deepspeed.precision, torch.cuda.is_available())
    if slow_bf16 and info.rank == 0:
        print(f"WARNING: {slow_bf16}", flush=True)
    fingerprint = json.loads(json.dumps(config_fingerprint(
        flatten(cfg), prepared.vocab_sha256, prepared.data_identity, total_steps, prepared.fingerprint_keys)))
    # The probe cells (None when health is off); a bad probe fails here, before any engine starts.
    health = HealthMonitor.from_config(cfg, prepared.vocab_sha256, prepared.vocab_path, total_steps, info.rank)

    ds_config = build_ds_config(cfg, info.world_size)
    model = task.build_model(cfg, ds_config)
    n_nonembed = task.flop_params(model)
    engine, _, _ = initialize_engine(cfg, model, ds_config, steps_per_epoch)
    float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
    teacher = None
    spec = task.teacher(engine.module, cfg)
    if spec is not None:
        teacher = Teacher(spec.source, cfg.deepspeed.zero_stage, spec.build_like, ds_config, info.rank,
                          forward_dtype=float_dtype)

    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last, info.rank, info.world_size)
    resume_dir = resolve_verified_resume(ckpt.root, cfg.checkpoint.resume, info.rank, info.world_size)
    if resume_dir is None and committed_checkpoints(ckpt.root):
        # A fresh start here would prune and overwrite another run's checkpoints.
        raise ResumeError(f"{run_dir} already holds committed checkpoints: pass --resume auto to continue "
                          "it, or choose a new run_dir")
    ckpt.clean_uncommitted()
    if resume_dir is None and teacher is not None:
        task.init_teacher(teacher)  # e.g. the pre-trained teacher; a resume loads the checkpoint's
    state = TrainState(total_steps=total_steps, fingerprint=fingerprint)
    resumed_loader_state = None
    if resume_dir is not None:
        check_same_run(resume_dir, fingerprint, cfg.checkpoint.allow_config_change, info.rank)
        saved, rank_state = ckpt.load(resume_dir, engine, teacher)
        state.load_state_dict(saved)
        task.load_state_dict(saved.get("task", {}))
        resumed_loader_state = rank_state["loader"]
        if info.rank == 0:
            print(f"resumed from {resume_dir} at step {state.step} (epoch {state.epoch}, batch "
                  f"{state.batches_done})", flush=True)

    tracker = make_tracker(cfg.tracking, run_dir, info.rank,
                           tags={"git_sha": git_sha(), "world_size": str(info.world_size), "task": task.name,
                                 "objective": cfg.objective, "zero_stage": str(cfg.deepspeed.zero_stage)},
                           resume=resume_dir is not None,
                           run_name=default_run_name(cfg.objective, cfg.model.d_model, cfg.model.n_layers, run_dir.name))
    if info.rank == 0:
        _write_run_files(cfg, run_dir, ds_config, prepared.vocab_path, tracker, resumed_at=state.step if resume_dir else None)
    losslog = _LossLog(run_dir / LOSS_LOG, state.step) if info.rank == 0 else None
    healthlog = _LossLog(run_dir / HEALTH_LOG, state.step) if info.rank == 0 and health is not None else None
    if health is not None:
        health.attach(tracker, healthlog)
    progress = None
    if info.rank == 0 and cfg.tracking.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=state.step, desc=f"{task.name} {cfg.objective}", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())  # quiet in logs and CI
    return Trainer(cfg=cfg, task=task, prepared=prepared, info=info, run_dir=run_dir,
                   terms=task.loss_terms(cfg), steps_per_epoch=steps_per_epoch, engine=engine, teacher=teacher,
                   float_dtype=float_dtype, n_nonembed=n_nonembed, ckpt=ckpt, state=state, resume_dir=resume_dir,
                   tracker=tracker, health=health, losslog=losslog, healthlog=healthlog,
                   last_logged=tracker.last_logged_step(), resumed_loader_state=resumed_loader_state,
                   progress=progress)


def check_same_run(resume_dir: Path, fingerprint: dict, allow_change: bool, rank: int) -> None:
    """A resume continues the checkpoint's run: same model, data, objective and schedule (the
    fingerprint), unless the user allows a change explicitly."""
    saved = json.loads((resume_dir / "train_state.json").read_text()).get("fingerprint")
    if saved is None:
        if rank == 0:
            print(f"note: {resume_dir} predates config fingerprints; the resume is not checked against it", flush=True)
        return
    diffs = fingerprint_differences(saved, fingerprint)
    refusal = shape_change_refusal(saved, fingerprint) if diffs and allow_change else None
    if refusal:  # before DeepSpeed loads anything: no flood of size-mismatch lines
        raise ResumeError(f"{resume_dir}: {refusal}")
    if diffs and not allow_change:
        raise ResumeError(f"{resume_dir}: this run's config differs from the checkpoint's in "
                          f"{len(diffs)} key(s) that define the run: {describe_differences(diffs)}. Resume "
                          "with the checkpoint's values, or pass --allow-config-change "
                          "(checkpoint.allow_config_change=true) to continue under the new ones")
    if diffs and rank == 0:
        print(f"WARNING: resuming {resume_dir} with a changed config (allowed): {describe_differences(diffs)}",
              flush=True)


def _write_run_files(cfg: TrainConfig, run_dir: Path, ds_config: dict, vocab_path: Path, tracker,
                     resumed_at: int | None) -> None:
    """config.yaml, ds_config.json, vocab.json (+ MLflow params and artefacts on a fresh start).
    A resume that changes the config keeps the previous config.yaml beside the new one."""
    config_yaml = run_dir / "config.yaml"
    if resumed_at is not None and config_yaml.exists():
        previous = config_yaml.read_text()
        save_config(cfg, config_yaml)
        if config_yaml.read_text() != previous:
            atomic_write_text(run_dir / f"config.before_step_{resumed_at:08d}.yaml", previous)
    else:
        save_config(cfg, config_yaml)
    atomic_write_text(run_dir / "ds_config.json", json.dumps(ds_config, indent=2))
    if resumed_at is None:
        if vocab_path is not None:  # a task without a gene vocabulary has none
            shutil.copyfile(vocab_path, run_dir / "vocab.json")
        tracker.log_params(flatten(cfg))
        for name in ("config.yaml", "ds_config.json", "vocab.json"):
            if (run_dir / name).exists():
                tracker.log_artifact(run_dir / name)


def open_epoch(tr: Trainer):
    """The loader of the current epoch (from the resumed position the first time); its batches."""
    resume = tr.resumed_loader_state if tr.state.batches_done else None
    tr.loader = tr.task.open_loader(tr.cfg, tr.info, tr.state.epoch, resume, tr.prepared)
    tr.resumed_loader_state, tr.consumed = None, 0
    return iter(tr.loader)


def batch_tokens(batch: dict) -> float:
    """Tokens a batch carries (throughput): its cells' lengths; 0 for batches that are not cells."""
    return float(batch["lengths"].sum()) if "lengths" in batch else 0.0


def micro_step(tr: Trainer, batch: dict, micro: int) -> torch.Tensor:
    """Forward, loss and backward of one micro-batch; returns [loss terms..., tokens], all-reduced."""
    cfg, state = tr.cfg, tr.state
    torch.manual_seed(step_seed(cfg.seed, state.step, micro, tr.info.rank))
    out = tr.engine(batch)
    losses = tr.task.losses(out, batch, tr.teacher, cfg)
    terms = torch.stack([losses[t].detach().double().cpu() for t in tr.terms]
                        + [torch.tensor(batch_tokens(batch), dtype=torch.float64)])
    if dist.is_initialized():
        dist.all_reduce(terms)  # NaN on any rank -> NaN on all: every rank decides alike
    bad_terms = [n for n, v in zip(tr.terms, terms[:-1]) if not math.isfinite(v)]
    if bad_terms and cfg.nonfinite_policy == "stop":
        raise NonFiniteError(
            f"non-finite {', '.join(bad_terms)} at {step_label(state.step)}, epoch {state.epoch}, batch "
            f"{state.batches_done}; stopped before the optimiser step; last committed checkpoint: {tr.last_commit()}")
    tr.engine.backward(losses["loss"])
    return terms


def train_step(tr: Trainer, batches) -> tuple[dict, dict]:
    """One optimiser step: `gradient_accumulation_steps` micro-batches from `batches`, the step,
    the EMA update. Returns (the step's loss record, its metrics)."""
    cfg, state, engine = tr.cfg, tr.state, tr.engine
    t_start = time.perf_counter()
    sums = torch.zeros(len(tr.terms) + 1, dtype=torch.float64)  # loss terms, tokens over the step
    for micro in range(tr.grad_accum):
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError(f"epoch {state.epoch}: the loader stopped after {state.batches_done} batches, "
                               f"expected {tr.batches_per_epoch_used}")
        batch = _to_device(batch, engine.device, tr.float_dtype)
        sums += micro_step(tr, batch, micro)
        state.batches_done += 1
        tr.consumed += 1
        if micro != tr.grad_accum - 1:
            engine.step()  # DeepSpeed counts micro-steps; no optimiser step here

    grad_norm = _check_grads_before_step(engine, cfg, state.step)
    skipped_before = engine.skipped_steps
    engine.step()
    applied = engine.skipped_steps == skipped_before
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    if not applied and cfg.nonfinite_policy == "stop":
        raise NonFiniteError(f"non-finite gradient norm at {step_label(state.step)}: DeepSpeed skipped the optimiser step; "
                             f"stopped; last committed checkpoint: {tr.last_commit()}")
    momentum = momentum_at(state.step, state.total_steps, cfg.ema.schedule, cfg.ema.base, cfg.ema.final)
    if tr.teacher is not None and applied:
        tr.teacher.update(momentum)
    state.step += 1

    elapsed = time.perf_counter() - t_start
    world = tr.info.world_size
    cells, tokens = tr.prepared.cells_per_batch * tr.grad_accum * world, float(sums[-1])
    mean = sums[:-1] / (tr.grad_accum * world)
    record = {"step": state.step, "epoch": state.epoch, **{t: float(v) for t, v in zip(tr.terms, mean)}}
    metrics = {**{k: v for k, v in record.items() if k.startswith("loss")},
               "lr": engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "cells_per_s": cells / elapsed, "tokens_per_s": tokens / elapsed,
               "memory_mb": peak_memory_mb(), "step_applied": float(applied)}
    if tr.teacher is not None:
        metrics["ema_momentum"] = momentum
    if cfg.tracking.peak_tflops > 0 and "gene_ids" in batch:
        fpt = flops_per_token(tr.n_nonembed, cfg.model.n_layers, cfg.model.d_model, batch["gene_ids"].shape[1],
                              tr.teacher is not None)
        metrics["mfu"] = fpt * tokens / elapsed / (cfg.tracking.peak_tflops * 1e12 * world)
    return record, metrics


def report_step(tr: Trainer, record: dict, metrics: dict) -> None:
    """Loss log, heartbeat, MLflow, health probe (every rank), progress bar."""
    step = tr.state.step
    beat(step)
    if tr.losslog is not None:
        tr.losslog.add(record)
        # Heartbeat for watchdogs (and the kill test): where the run is right now.
        atomic_write_text(tr.run_dir / PROGRESS_FILE, json.dumps({"step": step, "epoch": tr.state.epoch}), fsync=False)
    if step % tr.cfg.tracking.log_every == 0 and step > tr.last_logged:
        tr.tracker.log_step(step, metrics)
    if tr.health is not None:  # every rank: collective forwards under ZeRO-3
        tr.health.after_step(step, tr.engine.module, tr.teacher, tr.engine.device, tr.float_dtype)
    if tr.progress is not None:
        tr.progress.update(1)
        tr.progress.set_postfix(loss=f"{record['loss']:.4f}", cells_s=f"{metrics['cells_per_s']:.0f}")


def data_stats(tr: Trainer) -> dict[str, float]:
    """The loader's skip counters over all ranks (collective): shards skipped (max over ranks),
    cells skipped and dropped (sums)."""
    s = tr.loader.stats()
    cells = torch.tensor([s["skipped_cells"], s["dropped_cells"]], dtype=torch.float64)
    shards = torch.tensor([s["skipped_shards"]], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(cells)
        dist.all_reduce(shards, op=dist.ReduceOp.MAX)
    return {"data/skipped_shards": float(shards[0]), "data/skipped_cells": float(cells[0]),
            "data/dropped_cells": float(cells[1])}


def commit(tr: Trainer) -> Path:
    """Collective: checkpoint the run at its current step (every rank), with the logs that go with it."""
    step = tr.state.step
    if tr.loader is not None:
        stats = data_stats(tr)
        if step > tr.last_logged:
            tr.tracker.log_step(step, stats)
    tr.tracker.flush()  # before the marker: a kill in between re-logs nothing (see MlflowTracker)
    for log in (tr.losslog, tr.healthlog):
        if log is not None:
            log.flush()
    cfg = tr.cfg
    # What an offline export needs (celljepa_dist/export.py): no DeepSpeed, no YAML.
    export_facts = {"objective": cfg.objective, "zero_stage": cfg.deepspeed.zero_stage, "model": cfg.model.to_dict(),
                    "vocab_sha256": tr.vocab_sha256, "data": tr.prepared.tokenisation, "task_name": tr.task.name}
    global_state = {**tr.state.state_dict(), **export_facts, "task": tr.task.state_dict()}
    with collective_timeout(cfg.distributed.commit_timeout_s, cfg.distributed.timeout_s, f"commit of step {step}"):
        d = tr.ckpt.save(step, tr.engine, tr.teacher, global_state, tr.rank_state())
    tr.committed.append(d)
    return d


def end_epoch(tr: Trainer) -> None:
    """The epoch just finished: the task's validation (collective), logged at this step."""
    metrics = tr.task.after_epoch(tr)
    if metrics and tr.state.step > tr.last_logged:
        tr.tracker.log_step(tr.state.step, metrics)
    tr.state.epoch, tr.state.batches_done = tr.state.epoch + 1, 0


def run(cfg: TrainConfig, task: Task | None = None) -> RunResult:
    """Train per `cfg` (pre-training unless `task` says otherwise) on the process group of the
    launcher; returns where things are (all ranks)."""
    tr = setup(cfg, task)
    enter_training(cfg.distributed.timeout_s)  # every rank set up; from here a silent rank is reported
    state = tr.state
    last_saved = state.step if tr.resume_dir is not None else -1
    try:
        while state.step < state.total_steps:
            batches = open_epoch(tr)
            while True:
                record, metrics = train_step(tr, batches)
                report_step(tr, record, metrics)
                if state.batches_done >= tr.batches_per_epoch_used:
                    end_epoch(tr)
                if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                    commit(tr)
                    last_saved = state.step
                if state.step >= state.total_steps or state.batches_done == 0:
                    break  # done, or the epoch ended: the next loader starts the next epoch
        if last_saved != state.step:
            commit(tr)
        tr.task.finish(tr)
    except BaseException as exc:
        with shielded():  # a signal now (a launcher stopping its ranks) must not cut this short
            # KILLED (Ctrl-C, SIGTERM) or FAILED; MLflow's own failure here is a warning, never the error
            finish_failed(tr.tracker, end_status(exc))
        # A collective that timed out or lost a peer: raised again naming the step and the silent rank.
        dist_cfg = cfg.distributed
        explain_failure(exc, step=state.step + 1, timeout_s=dist_cfg.timeout_s, heartbeat_s=dist_cfg.heartbeat_s,
                        run_dir=tr.run_dir, rank=tr.info.rank, world_size=tr.info.world_size,
                        last_commit=tr.last_commit())
        raise
    finally:
        if tr.progress is not None:
            tr.progress.close()
    if tr.info.rank == 0:
        _summarise_run(tr.tracker, tr.run_dir)
    tr.tracker.finish("FINISHED")
    return RunResult(run_dir=tr.run_dir, final_step=state.step, checkpoints=tr.committed,
                     mlflow_run_id=tr.tracker.run_id)


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
        raise NonFiniteError(f"non-finite gradient norm ({norm}) at {step_label(step)}; stopped before the optimiser step")
    return norm
