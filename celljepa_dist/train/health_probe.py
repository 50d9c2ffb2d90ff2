"""Representation health during pre-training: a fixed probe set of cells, embedded by the student
and the teacher every `tracking.health_every` steps and at each commit (docs/health.md).

The probe is the first `tracking.probe_cells` cells of `tracking.probe_shards` in shard order,
tokenised by the training collate with a fixed seed and epoch, so every run and every resume sees
the same tokens. Two views of each cell:
  unmasked  mask_ratio 0: the student's and the teacher's `<cls>` (health metrics);
  masked    the training mask_ratio: predictor(student `<cls>`) against the teacher's `<cls>` of
            the unmasked view (the JEPA prediction cosine; celljepa only). Both views keep the
            same genes (collate.select_tokens picks the kept genes before masking), so the
            teacher's target is exactly the one training uses.
The forward passes run on every rank (ZeRO-3 gathers parameters collectively), in eval mode and
without gradients; they draw no random numbers, and the loop re-seeds before each micro-batch
anyway, so training is unchanged by them. Rank 0 logs and warns.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from celljepa_dist.data.collate import collate_cells, to_tensors
from celljepa_dist.data.shards import CellBlock, read_manifest, read_shard, sha256_file
from celljepa_dist.health import (
    HealthMetrics,
    HealthThresholds,
    collapse_warnings,
    health_metrics,
    jepa_prediction_cosine,
)
from celljepa_dist.model.cell_jepa import teacher_embedding

HEALTH_LOG = "health.jsonl"
PREFIX = "health/"
WARNINGS_KEY = f"{PREFIX}warnings"
JEPA_KEY = f"{PREFIX}jepa_pred_cos"
# The masked view's masks: fixed, not the run's seed, so runs with different seeds are compared
# on the same probe tokens.
PROBE_SEED, PROBE_EPOCH = 0, 0


# --- the probe cells ------------------------------------------------------------------------------

def load_probe_cells(shards_dir: str | Path, n_cells: int, vocab_sha256: str, vocab_path: str | Path,
                     n_bins: int) -> CellBlock:
    """The first `n_cells` cells of a shard set in manifest order, checked against the training
    vocab, binning and the manifest's checksums. Errors name the file and the config key."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    where = f"tracking.probe_shards={shards_dir}"
    if manifest["vocab_sha256"] != vocab_sha256:
        raise ValueError(f"{where}: {shards_dir / 'manifest.json'} was built with vocab sha256 "
                         f"{manifest['vocab_sha256']}, but the training vocab {vocab_path} has {vocab_sha256}: "
                         "build the probe shards with the training vocab")
    if manifest["binning"]["n_bins"] != n_bins:
        raise ValueError(f"{where}: binned with n_bins={manifest['binning']['n_bins']}, the model has "
                         f"model.n_bins={n_bins}")
    if manifest["total_cells"] < n_cells:
        raise ValueError(f"{where}: {manifest['total_cells']} cells, fewer than tracking.probe_cells={n_cells}")
    blocks, have = [], 0
    for entry in manifest["shards"]:
        path = shards_dir / entry["name"]
        if not path.is_file():
            raise FileNotFoundError(f"{where}: shard {path} listed in the manifest is missing")
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{where}: shard {path} does not match its sha256 in the manifest")
        block = read_shard(path)
        blocks.append(block.slice(0, min(len(block), n_cells - have)))
        have += len(blocks[-1])
        if have == n_cells:
            break
    return CellBlock.concat(blocks)


@dataclass
class ProbeChunk:
    unmasked: dict[str, torch.Tensor]
    masked: dict[str, torch.Tensor] | None  # None when there is no JEPA term to probe


def tokenise_probe(cells: CellBlock, max_genes: int, mask_ratio: float | None, chunk_cells: int) -> list[ProbeChunk]:
    """Probe cells -> CPU batches of at most `chunk_cells` cells (collate.py's tokens, fixed seed)."""
    chunks = []
    for start in range(0, len(cells), chunk_cells):
        part = cells.slice(start, min(start + chunk_cells, len(cells)))
        args = (part.offsets, part.genes, part.bins, part.joinids)
        common = {"seed": PROBE_SEED, "epoch": PROBE_EPOCH, "max_genes": max_genes}
        unmasked = to_tensors(collate_cells(*args, mask_ratio=0.0, **common))
        masked = None if mask_ratio is None else to_tensors(collate_cells(*args, mask_ratio=mask_ratio, **common))
        chunks.append(ProbeChunk(unmasked, masked))
    return chunks


# --- the forward passes ---------------------------------------------------------------------------

def _on_device(batch: dict[str, torch.Tensor], device, float_dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device).to(float_dtype) if k == "values" else v.to(device) for k, v in batch.items()}


@torch.no_grad()
def probe_embeddings(model, teacher, chunks: list[ProbeChunk], device, float_dtype) -> dict[str, np.ndarray]:
    """`student` (and `teacher`, `jepa_pred` when there is a teacher) `<cls>` rows of all probe
    cells, float32 numpy. `model` is the CellJEPA (engine.module); collective under ZeRO-3."""
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"student": [], "teacher": [], "jepa_pred": []}
    try:
        for chunk in chunks:
            plain = _on_device(chunk.unmasked, device, float_dtype)
            hidden = model.student(plain["gene_ids"], plain["values"], plain["padding_mask"], None)
            out["student"].append(hidden[:, 0].float().cpu())
            if teacher is None:
                continue
            out["teacher"].append(teacher_embedding(teacher, plain).cpu())
            masked = _on_device(chunk.masked, device, float_dtype)
            hidden = model.student(masked["gene_ids"], masked["values"], masked["padding_mask"], masked["value_mask"])
            out["jepa_pred"].append(model.predictor(hidden[:, 0]).float().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


def health_record(embeddings: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, HealthMetrics]]:
    """Flat `health/...` metrics and the per-encoder HealthMetrics they came from."""
    per_encoder = {name: health_metrics(embeddings[name]) for name in ("student", "teacher") if name in embeddings}
    flat = {f"{PREFIX}{name}/{k}": v for name, m in per_encoder.items() for k, v in m.as_dict().items()}
    if "jepa_pred" in embeddings:
        flat[JEPA_KEY] = jepa_prediction_cosine(embeddings["jepa_pred"], embeddings["teacher"])
    return flat, per_encoder


def format_warning(step: int, lines: list[str], n_cells: int, probe: str) -> str:
    """The loud multi-line block printed on stderr when a threshold is crossed."""
    bar = "=" * 88
    body = "\n".join(f"  * {line}" for line in lines)
    return (f"\n{bar}\nREPRESENTATION COLLAPSE WARNING at step {step}: {len(lines)} health metric(s) past "
            f"their threshold\n{body}\n  probe: {n_cells} cells of {probe}; thresholds: "
            f"tracking.health_thresholds (docs/health.md).\n  Training continues; the `<cls>` embeddings "
            f"may be close to useless for zero-shot work.\n{bar}\n")


def health_due(step: int, health_every: int, checkpoint_every: int, total_steps: int) -> bool:
    """Every `health_every` steps and at each commit (every checkpoint and the last step)."""
    if health_every <= 0:
        return False
    return step % health_every == 0 or bool(checkpoint_every and step % checkpoint_every == 0) or step >= total_steps


def last_logged_health_step(tracker) -> int:
    """Highest step with health metrics already in the tracked run (-1 if none or untracked):
    a resume after a kill between a flush and its commit must not log them twice."""
    from celljepa_dist.tracking import MlflowTracker

    if not isinstance(tracker, MlflowTracker):
        return -1
    history = tracker.client.get_metric_history(tracker.run_id, f"{PREFIX}student/rankme")
    return max((m.step for m in history), default=-1)


class HealthMonitor:
    """Owns the probe tokens; `after_step` measures when due, logs (rank 0) and warns."""

    def __init__(self, chunks: list[ProbeChunk], thresholds: HealthThresholds, health_every: int,
                 checkpoint_every: int, total_steps: int, rank: int, probe_name: str):
        self.chunks, self.thresholds = chunks, thresholds
        self.health_every, self.checkpoint_every, self.total_steps = health_every, checkpoint_every, total_steps
        self.rank, self.probe_name = rank, probe_name
        self.n_cells = sum(len(c.unmasked["cell_ids"]) for c in chunks)
        self.tracker, self.log, self.last_logged = None, None, -1

    def attach(self, tracker, log) -> None:
        """Where rank 0 logs: the run's tracker and a jsonl log flushed with commits (None on other ranks)."""
        self.tracker, self.log = tracker, log
        self.last_logged = last_logged_health_step(tracker)

    @classmethod
    def from_config(cls, cfg, vocab_sha256: str, vocab_path, total_steps: int, rank: int) -> "HealthMonitor | None":
        """None when health is off (tracking.health_every 0 or tracking.probe_shards "")."""
        t = cfg.tracking
        if not t.health_enabled:
            return None
        cells = load_probe_cells(t.probe_shards, t.probe_cells, vocab_sha256, vocab_path, cfg.model.n_bins)
        mask_ratio = cfg.data.mask_ratio if cfg.objective == "celljepa" else None
        chunks = tokenise_probe(cells, cfg.data.max_genes, mask_ratio, cfg.data.batch_size)
        return cls(chunks, t.health_thresholds, t.health_every, cfg.checkpoint.every_steps, total_steps,
                   rank, t.probe_shards)

    def measure(self, model, teacher, device, float_dtype) -> tuple[dict[str, float], list[str]]:
        """Metrics and warning lines now (every rank runs the forwards)."""
        flat, per_encoder = health_record(probe_embeddings(model, teacher, self.chunks, device, float_dtype))
        lines = [w for name, m in per_encoder.items()
                 for w in collapse_warnings(m, self.thresholds, f"{name} <cls>")]
        flat[WARNINGS_KEY] = float(len(lines))
        return flat, lines

    def after_step(self, step: int, model, teacher, device, float_dtype) -> dict[str, float] | None:
        """Call on every rank after optimiser step `step` (before its commit, if any)."""
        if not health_due(step, self.health_every, self.checkpoint_every, self.total_steps):
            return None
        flat, lines = self.measure(model, teacher, device, float_dtype)
        if self.rank != 0:
            return flat
        if lines:
            print(format_warning(step, lines, self.n_cells, self.probe_name), file=sys.stderr, flush=True)
        if self.log is not None:
            self.log.add({"step": step, **{k[len(PREFIX):]: v for k, v in flat.items()}})
        if self.tracker is not None and step > self.last_logged:
            self.tracker.log_step(step, flat)
        return flat
