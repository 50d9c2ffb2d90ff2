"""Streaming loader: webdataset shard reading + DataLoader workers + exact mid-epoch resume.

    loader, n = build_loader(cfg, rank, world_size, epoch, resume_state=None)
    for i, batch in enumerate(loader):      # n batches, identical count on every rank
        ...
        state = loader.state_dict(i + 1)    # save with the checkpoint; pass back to resume

The order of cells is a pure function of (seed, epoch) and the (rank, batch) partition is in
`order.py`; a cell's tokens depend only on (seed, epoch, cell) (`collate.py`). DataLoader workers
take turns building the rank's batches and the loader yields them in index order, so the batch
sequence does not depend on the number of workers, and a resumed loader (any worker count)
yields exactly the batches the uninterrupted one would have. Workers share decoded shards
(`shard_cache.py`); shards are read by `shard_reader.py`.

Bad shards (sha256 mismatch, truncated tar, undecodable member): `on_error="raise"` raises an
error naming the shard; `on_error="skip"` warns, skips the whole shard and refills the lost slots
with the following good cells of the rank's span (order.fill_skipped), so every rank still
yields exactly `n` full batches; `stats()` counts the skipped cells and the loader raises when
they exceed `max_skip_fraction` of the rank's cells.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from celljepa_dist.typed_config import check_choices, invalid

from . import order as O
from .collate import check_mask_ratio, collate_cells_packed, gather_cells, hashable_layout
from .shard_cache import ReadAhead, SharedShardCache, make_cache_dir
from .shard_reader import ShardCells, ShardError, read_shard_cells  # noqa: F401 (re-exported)
from .shards import check_vocab_hash, join_offsets, read_manifest

STATE_FORMAT = "celljepa-loader-state/1"


@dataclass
class LoaderConfig:
    shards_dir: str = ""
    batch_size: int = 32  # per rank
    max_genes: int = 600  # paper 2.1 L_max; <cls> comes on top
    mask_ratio: float = 0.15  # 0.15 pre-training, 0.4 finetuning, 0 teacher/eval
    # Order and masking seed. In a TrainConfig, `data.seed` defaults to the top-level `seed`
    # (config.load_config), so `--set seed=1` changes the data order too.
    seed: int = 0
    num_workers: int = 2
    pin_memory: bool = True  # only takes effect when CUDA is available
    prefetch_factor: int = 4  # batches in flight per worker
    known_first: bool = False  # <cls>, known genes, then masked genes (helps attention kernels)
    # Consecutive batches per worker turn. Workers share decoded shards (shard_cache.py), so 1 is
    # best; larger values make the main process buffer up to (num_workers - 1) * chunk batches.
    worker_chunk_batches: int = 1
    on_error: Literal["raise", "skip"] = "raise"
    max_skip_fraction: float = 0.01  # of the rank's cells, under on_error="skip"
    verify_checksums: bool = True  # sha256 of each shard against the manifest
    vocab_path: str | None = None  # when set, the manifest's vocab hash must match this vocab

    def validate(self, where: str = "LoaderConfig") -> None:
        """Raises ConfigError naming `where.field`; pure (never changes the config)."""
        if not self.shards_dir:
            raise invalid(where, "shards_dir", self.shards_dir, "must be set")
        for name in ("batch_size", "max_genes", "prefetch_factor", "worker_chunk_batches"):
            if getattr(self, name) < 1:
                raise invalid(where, name, getattr(self, name), "must be >= 1")
        if self.num_workers < 0:
            raise invalid(where, "num_workers", self.num_workers, "must be >= 0")
        try:
            check_mask_ratio(self.mask_ratio)
        except ValueError:
            raise invalid(where, "mask_ratio", self.mask_ratio, "must be in [0, 1]") from None
        check_choices(self, where)
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise invalid(where, "max_skip_fraction", self.max_skip_fraction, "must be in [0, 1]")


# --- the per-rank dataset -------------------------------------------------------------------------

class SharedBuffer:
    """alloc() for collate_cells_packed in a DataLoader worker: a uint8 tensor born in shared memory.

    A tensor made in ordinary memory is copied into a new shared segment when the worker sends it
    (~10 ms for a 700 kB batch here); one created shared is sent as a file descriptor only.
    """

    def __call__(self, nbytes: int) -> np.ndarray:
        storage = torch.UntypedStorage._new_shared(nbytes)
        self.tensor = torch.empty(0, dtype=torch.uint8).set_(storage)
        return self.tensor.numpy()


class CellStream(IterableDataset):
    """Yields one rank's batches of one epoch (from `start_batch`); see the module docstring."""

    def __init__(self, cfg: LoaderConfig, manifest: dict, epoch: int, plan: O.RankPlan, start_batch: int):
        self.cfg, self.epoch, self.plan, self.start_batch = cfg, epoch, plan, start_batch
        self.shards = manifest["shards"]
        self.shard_cells = [int(s["cells"]) for s in self.shards]
        self.chunk = cfg.worker_chunk_batches
        # Shared with the workers (fork or spawn): 1 where a shard was found bad. Read by stats().
        self.bad_flags = torch.zeros(len(self.shards), dtype=torch.int8).share_memory_()
        # Per worker: first position of the batch it is on (span_stop when done); shards that end
        # before the slowest worker's position are deleted from the shared cache.
        self.progress = torch.zeros(max(1, cfg.num_workers), dtype=torch.int64).share_memory_()
        self.cache_root: Path | None = None  # set per iteration by CellLoader when workers share shards

    def __len__(self) -> int:
        return self.plan.num_batches - self.start_batch

    def _load(self, index: int) -> ShardCells:
        entry = self.shards[index]
        sha = entry["sha256"] if self.cfg.verify_checksums else None
        return read_shard_cells(Path(self.cfg.shards_dir) / entry["name"], sha, int(entry["cells"]))

    def skipped_cells(self, order: O.EpochOrder, bad: set[int]) -> int:
        """Cells of the rank's span that sit in bad shards."""
        lost = 0
        for visit, s in enumerate(order.shard_order):
            if int(s) in bad:
                a = max(int(order.starts[visit]), self.plan.span_start)
                b = min(int(order.starts[visit + 1]), self.plan.span_stop)
                lost += max(0, b - a)
        return lost

    def _resolve(self, order, positions, cache, bad, shared=None, ahead=None):
        """Positions -> (shard, cell) after loading shards, marking bad ones and refilling."""
        while True:
            pos = O.fill_skipped(order, self.plan, positions, bad)
            shard, cell = order.locate(pos)
            newly_bad = False
            for s in np.unique(shard).tolist():
                if s in cache:
                    continue
                try:
                    if shared is not None:
                        cache[s] = shared.get(s)
                    elif ahead is not None:
                        cache[s] = ahead.get(s)
                    else:
                        cache[s] = self._load(s)
                except ShardError as e:
                    if self.cfg.on_error == "raise":
                        raise
                    warnings.warn(f"skipping {e}", RuntimeWarning, stacklevel=2)
                    bad.add(s)
                    self.bad_flags[s] = 1
                    newly_bad = True
            if not newly_bad:
                return shard, cell
            lost = self.skipped_cells(order, bad)
            span = self.plan.span_stop - self.plan.span_start
            if lost > self.cfg.max_skip_fraction * span:
                names = [self.shards[s]["name"] for s in sorted(bad)]
                raise ShardError(f"rank {self.plan.rank}: skipped {lost} of {span} cells "
                                 f"(> max_skip_fraction={self.cfg.max_skip_fraction}) in bad shards {names}")

    def _assemble(self, shard: np.ndarray, cell: np.ndarray, cache: dict, alloc=None) -> tuple:
        """Gather the batch's cells from their shards, keeping slot order."""
        pieces, slot_order = [], []
        for s in dict.fromkeys(shard.tolist()):  # shards in order of first appearance
            slots = np.flatnonzero(shard == s)
            data = cache[s]
            offsets, flat = gather_cells(data.offsets, cell[slots])
            pieces.append((offsets, data.genes[flat], data.bins[flat], data.joinids[cell[slots]], data.labels[cell[slots]]))
            slot_order.append(slots)
        if len(pieces) == 1:
            offsets, genes, bins, joinids, labels = pieces[0]
        else:
            offsets = join_offsets([p[0] for p in pieces])
            genes, bins, joinids, labels = (np.concatenate([p[i] for p in pieces]) for i in range(1, 5))
            back = np.argsort(np.concatenate(slot_order), kind="stable")  # grouped order -> slot order
            offsets, flat = gather_cells(offsets, back)
            genes, bins, joinids, labels = genes[flat], bins[flat], joinids[back], labels[back]
        cfg = self.cfg
        return collate_cells_packed(offsets, genes, bins, joinids, labels, seed=cfg.seed, epoch=self.epoch,
                                    max_genes=cfg.max_genes, mask_ratio=cfg.mask_ratio, known_first=cfg.known_first,
                                    alloc=alloc)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = O.EpochOrder(self.shard_cells, self.cfg.seed, self.epoch)
        visit_of = np.empty(len(self.shards), dtype=np.int64)
        visit_of[order.shard_order] = np.arange(len(self.shards))
        shared = ahead = None
        if workers > 1 and self.cache_root is not None:
            shared = SharedShardCache(self.cache_root, self._load, ShardCells, ShardError)
        else:  # a lone reader (in-process or one worker) decodes the next shard in a thread
            ahead = ReadAhead(self._load)
        cache: dict[int, ShardCells] = {}
        opened: set[int] = set()
        bad: set[int] = {i for i in range(len(self.shards)) if int(self.bad_flags[i])}
        try:
            for b in O.worker_batches(self.plan.num_batches, self.start_batch, worker, workers, self.chunk):
                positions = O.batch_positions(self.plan, b)
                self.progress[worker] = int(positions[0])  # shards wholly before this may go
                shard, cell = self._resolve(order, positions, cache, bad, shared, ahead)
                used = set(shard.tolist())
                for s in [s for s in cache if s not in used]:  # spans move forward: keep only live shards
                    del cache[s]
                order.forget(used)
                if shared is not None:
                    opened |= used
                    self._share_housekeeping(shared, order, visit_of, opened, int(positions[-1]))
                elif ahead is not None:
                    nxt = self._next_shard(order, int(positions[-1]))
                    if nxt is not None and nxt not in cache and nxt not in bad:
                        ahead.start(nxt)
                if info is None:
                    buffer, layout, _ = self._assemble(shard, cell, cache)
                    yield b, torch.from_numpy(buffer), layout
                else:  # build the batch straight into shared memory: sending it then copies nothing
                    shared_buffer = SharedBuffer()
                    _, layout, _ = self._assemble(shard, cell, cache, shared_buffer)
                    yield b, shared_buffer.tensor, layout
        finally:
            self.progress[worker] = self.plan.span_stop
            if shared is not None:
                shared.join()
            if ahead is not None:
                ahead.join()

    def _next_shard(self, order, last_position: int) -> int | None:
        """The first non-empty shard of the rank's span visited after the one holding last_position."""
        visit = int(np.searchsorted(order.starts, last_position, side="right") - 1) + 1
        while visit < len(order.shard_order) and order.starts[visit] < self.plan.span_stop:
            nxt = int(order.shard_order[visit])
            if self.shard_cells[nxt] > 0:
                return nxt
            visit += 1
        return None

    def _share_housekeeping(self, shared, order, visit_of, opened, last_position):
        """Decode the next shard ahead; delete shards every worker has moved past."""
        nxt = self._next_shard(order, last_position)
        if nxt is not None and nxt not in opened:
            shared.prefetch(nxt)
        slowest = int(self.progress.min())
        for s in [s for s in opened if order.starts[visit_of[s] + 1] <= slowest]:
            shared.release(s)
            opened.discard(s)


# --- the loader -----------------------------------------------------------------------------------

def unpack_batch(buffer: torch.Tensor, layout: list) -> dict[str, torch.Tensor]:
    """Tensor views into the (possibly pinned) batch buffer built by collate_cells_packed; no copy."""
    return {key: buffer[start:stop].view(dt).reshape(shape) for key, dt, shape, start, stop in _torch_views(hashable_layout(layout))}


@functools.lru_cache(maxsize=256)  # batches repeat a few layouts
def _torch_views(layout: tuple) -> tuple:
    out = []
    for key, dtype, shape, start in layout:
        dt = np.dtype(dtype)
        out.append((key, _TORCH_DTYPES[dt.str], tuple(shape), start, start + int(np.prod(shape)) * dt.itemsize))
    return tuple(out)


_TORCH_DTYPES = {np.dtype(d).str: t for d, t in [(np.int64, torch.int64), (np.int32, torch.int32),
                                                  (np.float32, torch.float32), (np.bool_, torch.bool)]}


def _as_is(item):
    return item  # the default (default_convert) walks every element of the layout list


def _fingerprint(manifest: dict) -> str:
    """Identifies the shard set, so a resume state is never applied to other data."""
    names = [(s["name"], int(s["cells"]), s["sha256"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]


class CellLoader:
    """DataLoader-like: iterate for the rank's batches; len() = batches it yields."""

    def __init__(self, dataset: CellStream, dataloader, fingerprint: str):
        self.dataset, self.dataloader, self.fingerprint = dataset, dataloader, fingerprint
        self.plan, self.epoch, self.start_batch = dataset.plan, dataset.epoch, dataset.start_batch

    def __iter__(self):
        """Batches in index order, whatever order the workers deliver them in."""
        dataset = self.dataset
        dataset.progress.fill_(self.plan.span_start + self.start_batch * self.plan.batch_size)
        dataset.cache_root = make_cache_dir() if dataset.cfg.num_workers > 1 else None
        batches = iter(self.dataloader)  # forks the workers, which see cache_root
        try:
            expected, pending = self.start_batch, {}
            for b, buffer, layout in batches:
                pending[b] = unpack_batch(buffer, layout)
                while expected in pending:
                    yield pending.pop(expected)
                    expected += 1
            if pending or expected != self.plan.num_batches:
                raise RuntimeError(f"loader ended at batch {expected} of {self.plan.num_batches} "
                                   f"with {len(pending)} out of order")
        finally:
            del batches  # shuts the workers down before their files go
            if dataset.cache_root is not None:
                shutil.rmtree(dataset.cache_root, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def epoch_batches(self) -> int:
        return self.plan.num_batches

    def state_dict(self, batches_consumed: int) -> dict:
        """Resume state after the caller consumed `batches_consumed` batches of this loader."""
        if not 0 <= batches_consumed <= len(self):
            raise ValueError(f"batches_consumed {batches_consumed} is not in [0, {len(self)}]")
        cfg = self.dataset.cfg
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batches_done": self.start_batch + batches_consumed,
                "seed": cfg.seed, "world_size": self.plan.world_size, "rank": self.plan.rank,
                "batch_size": self.plan.batch_size, "total_cells": self.plan.total_cells,
                "shards_fingerprint": self.fingerprint}

    def stats(self) -> dict:
        """Counters for MLflow: shards and rank cells skipped so far (under on_error='skip')."""
        bad = {i for i, f in enumerate(self.dataset.bad_flags.tolist()) if f}
        order = O.EpochOrder(self.dataset.shard_cells, self.dataset.cfg.seed, self.epoch)
        return {"skipped_shards": len(bad), "skipped_cells": self.dataset.skipped_cells(order, bad),
                "rank_cells": self.plan.span_stop - self.plan.span_start,
                "dropped_cells": self.plan.dropped_cells}


def _check_resume(state: dict, expected: dict) -> int:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"resume state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    for key in ("epoch", "seed", "world_size", "rank", "batch_size", "total_cells", "shards_fingerprint"):
        if state.get(key) != expected[key]:
            hint = " (changing world size mid-epoch is not supported: resume with the same world size or at an epoch boundary)" if key == "world_size" else ""
            raise ValueError(f"resume state {key}={state.get(key)!r} does not match this run's {expected[key]!r}{hint}")
    return int(state["batches_done"])


def build_loader(cfg: LoaderConfig, rank: int, world_size: int, epoch: int,
                 resume_state: dict | None = None, vocab_sha256: str | None = None) -> tuple[CellLoader, int]:
    """One epoch's loader for `rank`; returns (loader, number of batches it yields)."""
    cfg.validate()
    manifest = read_manifest(cfg.shards_dir)
    if cfg.vocab_path is not None:
        from .vocab import GeneVocab

        check_vocab_hash(manifest, GeneVocab.load(cfg.vocab_path).sha256, f"manifest in {cfg.shards_dir}")
    if vocab_sha256 is not None:
        check_vocab_hash(manifest, vocab_sha256, f"manifest in {cfg.shards_dir}")
    plan = O.rank_plan(int(manifest["total_cells"]), cfg.batch_size, world_size, rank)
    if plan.num_batches == 0:
        raise ValueError(f"{cfg.shards_dir}: {plan.total_cells} cells cannot fill one batch of "
                         f"{cfg.batch_size} on each of {world_size} ranks")
    fingerprint = _fingerprint(manifest)
    start = 0
    if resume_state is not None:
        start = _check_resume(resume_state, {"epoch": epoch, "seed": cfg.seed, "world_size": world_size,
                                             "rank": rank, "batch_size": cfg.batch_size,
                                             "total_cells": plan.total_cells, "shards_fingerprint": fingerprint})
        if not 0 <= start <= plan.num_batches:
            raise ValueError(f"resume state batches_done={start} is not in [0, {plan.num_batches}]")
    dataset = CellStream(cfg, manifest, epoch, plan, start)
    kwargs = {}
    if cfg.num_workers > 0:
        kwargs = {"prefetch_factor": cfg.prefetch_factor, "persistent_workers": False}
    dataloader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, collate_fn=_as_is,
                            pin_memory=cfg.pin_memory and torch.cuda.is_available(), **kwargs)
    loader = CellLoader(dataset, dataloader, fingerprint)
    return loader, len(loader)
