"""Shard-building job: cell source + vocab -> verified shards + one merged manifest.

Shard i holds the filtered cells sorted by soma_joinid at positions [i*C, (i+1)*C) (C =
cells_per_shard), fixed BEFORE empty cells are dropped, so the output does not depend on how many
jobs build it: job I of K builds the shards with i % K == I. Each finished shard gets a small
record in SHARDS/.parts/; whoever sees every record merges them into manifest.json (a pure
function of the records, so two jobs merging at once write identical bytes). A re-run skips
shards whose record and checksum verify, so a killed job resumes and ends byte-identical.
"""
from __future__ import annotations

import json
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from celljepa_dist.atomic import atomic_write_bytes

from .binning import BINNING_RULE, check_n_bins
from .kernels import NEGATIVE, NOT_FINITE, NOT_INTEGER, OK, prepare_rows, quantile_positions
from .shards import (
    BUILD_PARTS_DIR,
    BUILD_SETTINGS,
    CellBlock,
    ShardWriter,
    build_manifest,
    manifest_bytes,
    read_manifest,
    sha256_file,
    shard_name,
    write_manifest,
)
from .vocab import GeneVocab

PARTS_DIR = BUILD_PARTS_DIR
READ_CHUNK_CELLS = 4096
PREFETCH_CHUNKS = 2  # sub-chunks read ahead in a thread; 0 reads synchronously
MAX_PENDING_WRITES = 2  # processed sub-chunks queued for the writer thread (bounds memory)
BUILD_PARAMS = BUILD_SETTINGS


@dataclass
class ShardBuildConfig:
    out: str
    cells_per_shard: int = 20_000
    block_size: int = 1024
    n_bins: int = 51  # scGPT's n_bins: values 1..50, i.e. the paper's B = 50
    num_jobs: int = 1
    job_index: int = 0
    min_gene_match: float = 0.5  # fraction of the source's genes that must be in the vocab

    def validate(self) -> None:
        if self.cells_per_shard < 1:
            raise ValueError(f"cells_per_shard must be >= 1, got {self.cells_per_shard}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        check_n_bins(self.n_bins)
        if self.num_jobs < 1:
            raise ValueError(f"num_jobs must be >= 1, got {self.num_jobs}")
        if not 0 <= self.job_index < self.num_jobs:
            raise ValueError(f"job_index must be in 0..num_jobs-1 = 0..{self.num_jobs - 1}, got {self.job_index}")
        if not 0 <= self.min_gene_match <= 1:
            raise ValueError(f"min_gene_match must be in [0, 1], got {self.min_gene_match}")


def map_source_genes(feature_ids: list[str], feature_names: list[str], vocab: GeneVocab,
                     min_gene_match: float, where: str) -> tuple[np.ndarray, int]:
    if not feature_ids:  # every cell would be empty: refuse before anything is written
        raise ValueError(f"{where}: no genes (the source's var is empty)")
    seen: dict[str, int] = {}
    for i, fid in enumerate(feature_ids):
        if fid in seen:
            raise ValueError(f"{where}: duplicate feature_id {fid!r} (genes #{seen[fid]} and #{i})")
        seen[fid] = i
    tokens, unmatched = vocab.map_genes(feature_ids, feature_names)
    matched = 1 - unmatched / max(len(feature_ids), 1)
    if matched < min_gene_match:
        raise ValueError(f"{where}: only {matched:.1%} of {len(feature_ids)} genes are in the vocab "
                         f"(minimum {min_gene_match:.0%}); wrong vocab or gene id scheme?")
    return tokens, unmatched


def cells_to_block(joinids: np.ndarray, indptr: np.ndarray, gene_index: np.ndarray, values: np.ndarray,
                   tokens: np.ndarray, meta: dict[str, list], n_bins: int, raw_check: bool,
                   feature_ids: list[str], where: str) -> tuple[CellBlock, dict]:
    """Validate, map genes to tokens, bin, and drop empty cells: one shard's worth of cells.

    One compiled pass per cell (kernels.prepare_rows); this wrapper only names what failed."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    gene_index = np.ascontiguousarray(gene_index)
    offsets, tok, vals, bins, kept, n_zeros, n_unmatched, code, k = prepare_rows(
        indptr, gene_index, values, tokens, quantile_positions(n_bins), bool(raw_check))
    if code != OK:
        what = {NOT_FINITE: "is not finite", NEGATIVE: "is negative (counts must be >= 0)",
                NOT_INTEGER: "is not an integer count (declared raw; pass --allow-non-integer if intended)"}[code]
        row = int(np.searchsorted(indptr, k, side="right") - 1)
        raise ValueError(f"{where}: cell soma_joinid={int(joinids[row])}, gene {feature_ids[gene_index[k]]}: "
                         f"value {values[k]!r} {what}")
    nnz = int(offsets[-1])
    all_kept = len(kept) == len(joinids)
    block = CellBlock(offsets, tok[:nnz], bins[:nnz], vals[:nnz], np.asarray(joinids, np.int64)[kept],
                      {key: (list(v) if all_kept else [v[i] for i in kept]) for key, v in meta.items()})
    skipped = {"empty_cells": len(joinids) - len(kept), "explicit_zeros": int(n_zeros),
               "entries_not_in_vocab": int(n_unmatched)}
    return block, skipped


def _params(source, vocab: GeneVocab, cfg: ShardBuildConfig, n_cells: int) -> dict:
    # A source that resolves things at open time (H5adFilesSource: gene-id scheme, files) describes
    # itself; the others are described by their config.
    described = source.describe() if hasattr(source, "describe") else source.cfg.describe()
    return {"vocab_sha256": vocab.sha256, "n_bins": cfg.n_bins, "rule": BINNING_RULE, "source": described,
            "cells_per_shard": cfg.cells_per_shard, "block_size": cfg.block_size, "filtered_cells": int(n_cells),
            "raw_check": bool(source.layer_is_raw)}


def _settings_diff(out: Path, params: dict) -> list[str] | None:
    """The settings keys in which out/build.json differs from `params` (None: no build.json)."""
    path = out / BUILD_PARAMS
    if not path.exists():
        return None
    old, new = json.loads(path.read_text()), json.loads(manifest_bytes(params))  # compare as JSON values
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _committed_shards(out: Path) -> list[str]:
    """Names of the shards whose record is in PARTS_DIR: the shards a build has finished."""
    return sorted(p.name.removesuffix(".json") for p in (out / PARTS_DIR).glob("shard-*.tar.json"))


def _check_params(out: Path, params: dict) -> None:
    """Pin the settings in build.json. Other settings than the pinned ones are refused once a shard
    is committed under them; before that (a build that failed before finishing any shard, e.g. on
    a bad value) the record binds nothing, so the corrected re-run replaces it."""
    diff = _settings_diff(out, params)
    if diff:
        committed = _committed_shards(out)
        if committed:
            raise ValueError(f"{out} was built with different settings ({', '.join(diff)}) and holds "
                             f"{len(committed)} finished shards: use another --out or delete it")
    if diff != []:
        atomic_write_bytes(out / BUILD_PARAMS, manifest_bytes(params))


def _check_params_unchanged(out: Path, params: dict, name: str) -> None:
    """Before committing a shard: build.json still holds this job's settings. A job started with
    other settings before any shard was committed replaces the record (_check_params); the job
    whose settings were replaced stops here instead of mixing shards of two settings."""
    diff = _settings_diff(out, params)
    if diff:
        raise ValueError(f"{out / BUILD_PARAMS} changed while this job was building ({', '.join(diff)}; "
                         f"another job with other settings?): {name} not committed")


def _record_path(out: Path, i: int) -> Path:
    return out / PARTS_DIR / (shard_name(i) + ".json")


def _verified_record(out: Path, i: int) -> dict | None:
    rec_path, tar_path = _record_path(out, i), out / shard_name(i)
    if not (rec_path.exists() and tar_path.exists()):
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except json.JSONDecodeError:
        return None
    return rec if sha256_file(tar_path) == rec["sha256"] else None


def build_shards(source, vocab: GeneVocab, cfg: ShardBuildConfig, progress: bool = True,
                 timings: dict | None = None) -> dict | None:
    """Build this job's shards; return the merged manifest if every shard is now done, else None.
    `timings`, if given, accumulates wall seconds per stage (read, process, write)."""
    import time

    from tqdm import tqdm

    timings = {} if timings is None else timings

    def clock(stage, t0):
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens, genes_unmatched = map_source_genes(source.feature_ids, source.feature_names, vocab,
                                               cfg.min_gene_match, source.where)
    obs = source.cells()
    joinids = obs["soma_joinid"].to_numpy(np.int64)
    meta_cols = [c for c in obs.columns if c != "soma_joinid"]
    params = _params(source, vocab, cfg, len(joinids))
    _check_params(out, params)
    n_shards = -(-len(joinids) // cfg.cells_per_shard)
    mine = range(cfg.job_index, n_shards, cfg.num_jobs)
    bar = tqdm(total=sum(min(cfg.cells_per_shard, len(joinids) - i * cfg.cells_per_shard) for i in mine),
               desc=f"shards job {cfg.job_index}/{cfg.num_jobs}", unit="cell",
               disable=not progress or not sys.stderr.isatty())
    todo = []
    for i in mine:
        # A killed job leaves its temp file behind; only this job writes shard i, so it may remove it.
        for stale in out.glob(f".{shard_name(i)}.*.tmp"):
            stale.unlink(missing_ok=True)
        if _verified_record(out, i) is None:
            todo.append(i)
        else:
            bar.update(min(cfg.cells_per_shard, len(joinids) - i * cfg.cells_per_shard))
    # Three stages overlap: the next sub-chunks are read in one thread (TileDB releases the GIL),
    # this thread validates and bins (compiled, GIL released), and a writer thread streams the
    # finished cells into the shard and hashes them. Sub-chunks (READ_CHUNK_CELLS, not the shard
    # size) bound peak memory; the writer thread writes in submission order.
    chunks = [(i, c0, min(c0 + READ_CHUNK_CELLS, (i + 1) * cfg.cells_per_shard, len(joinids)))
              for i in todo for c0 in range(i * cfg.cells_per_shard, min((i + 1) * cfg.cells_per_shard, len(joinids)),
                                            READ_CHUNK_CELLS)]
    writers: dict[int, ShardWriter] = {}

    def read(k):
        t0 = time.perf_counter()
        result = source.read_rows(joinids[chunks[k][1]:chunks[k][2]])
        clock("read", t0)
        return result

    # The writer thread keeps running the tasks queued behind a failed one until this thread sees
    # the failure; without this flag it would then close and record the shard that lost a block
    # (a complete-looking shard with fewer cells). After a failure every queued task refuses.
    failed: list[BaseException] = []

    def guarded(task):
        def run(*args):
            if failed:
                raise RuntimeError(f"not run: an earlier write failed ({failed[0]!r})")
            try:
                return task(*args)
            except BaseException as e:
                failed.append(e)
                raise
        return run

    @guarded
    def write(i, block):
        t0 = time.perf_counter()
        if i not in writers:
            writers[i] = ShardWriter(out / shard_name(i), cfg.block_size)
        writers[i].add(block)
        clock("write", t0)
        return 0

    @guarded
    def finish(i, skipped):
        t0 = time.perf_counter()
        _check_params_unchanged(out, params, shard_name(i))
        entry = writers.pop(i).close()
        a, b = i * cfg.cells_per_shard, min((i + 1) * cfg.cells_per_shard, len(joinids))
        record = {**entry, "skipped": skipped, "first_joinid": int(joinids[a]), "last_joinid": int(joinids[b - 1])}
        atomic_write_bytes(_record_path(out, i), manifest_bytes(record))
        clock("write", t0)
        return b - a

    skipped: dict = {}
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer:
        reads = deque(reader.submit(read, k) for k in range(min(PREFETCH_CHUNKS, len(chunks))))
        writes: deque = deque()
        try:
            for k, (i, c0, c1) in enumerate(chunks):
                indptr, gene_index, values = reads.popleft().result() if PREFETCH_CHUNKS else read(k)
                if PREFETCH_CHUNKS and k + PREFETCH_CHUNKS < len(chunks):
                    reads.append(reader.submit(read, k + PREFETCH_CHUNKS))
                t0 = time.perf_counter()
                meta = {c: obs[c].iloc[c0:c1].tolist() for c in meta_cols}
                block, sk = cells_to_block(joinids[c0:c1], indptr, gene_index, values, tokens, meta, cfg.n_bins,
                                           source.layer_is_raw, source.feature_ids, f"{source.where} -> {shard_name(i)}")
                clock("process", t0)
                writes.append(writer.submit(write, i, block))
                skipped = {key: skipped.get(key, 0) + v for key, v in sk.items()}
                if k + 1 == len(chunks) or chunks[k + 1][0] != i:  # last sub-chunk of shard i
                    writes.append(writer.submit(finish, i, skipped))
                    skipped = {}
                while len(writes) > MAX_PENDING_WRITES or (writes and writes[0].done()):
                    bar.update(writes.popleft().result())
            while writes:
                bar.update(writes.popleft().result())
        except BaseException:
            # Stop both threads, then drop the unfinished shards' temp files (finished ones stay).
            for future in (*reads, *writes):
                future.cancel()
            writer.shutdown(wait=True)
            for w in writers.values():
                w.abort()
            raise
    bar.close()
    extra = {"labels": source.labels} if getattr(source, "labels", None) is not None else {}
    return merge_manifest(out, params, n_shards, genes_unmatched, where=source.where, **extra)


def nothing_left_message(where: str, filtered_cells: int, skipped: dict) -> str:
    """Why a build kept no cell, with the filter counts."""
    return (f"{where}: no cells left after filtering: all {filtered_cells} cells are empty "
            f"(no vocab gene with a non-zero count; skipped {skipped.get('empty_cells', 0)} empty cells, "
            f"{skipped.get('explicit_zeros', 0)} explicit zeros, {skipped.get('entries_not_in_vocab', 0)} "
            f"entries and {skipped.get('genes_not_in_vocab', 0)} genes not in the vocab)")


def _remove_build(out: Path, n_shards: int) -> None:
    """Remove what a build that kept no cell wrote (empty shards, their records, build.json), so
    that a corrected re-run into the same directory starts afresh."""
    for i in range(n_shards):
        (out / shard_name(i)).unlink(missing_ok=True)
        _record_path(out, i).unlink(missing_ok=True)
    (out / BUILD_PARAMS).unlink(missing_ok=True)


def merge_manifest(out: Path, params: dict, n_shards: int, genes_unmatched: int, where: str | None = None,
                   **extra) -> dict | None:
    """The manifest once every shard's record is there (else None). A build that kept no cell at
    all is refused (ValueError naming `where` and the filter counts) and leaves nothing behind:
    an empty manifest would pass for a shard set and train on nothing."""
    records = []
    for i in range(n_shards):
        path = _record_path(out, i)
        if not path.exists():
            return None
        records.append(json.loads(path.read_text()))
    skipped = {"genes_not_in_vocab": int(genes_unmatched)}
    for rec in records:
        for k, v in rec["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    if sum(r["cells"] for r in records) == 0:
        _remove_build(out, n_shards)
        raise ValueError(nothing_left_message(where or str(out), params["filtered_cells"], skipped)
                         + f"; nothing written to {out}")
    entries = [{"name": r["name"], "cells": r["cells"], "sha256": r["sha256"]} for r in records]
    manifest = build_manifest(entries, params["vocab_sha256"], params["n_bins"], params["source"], skipped,
                              cells_per_shard=params["cells_per_shard"], block_size=params["block_size"],
                              filtered_cells=params["filtered_cells"], **extra)
    write_manifest(out, manifest)
    return read_manifest(out)


__all__ = ["ShardBuildConfig", "build_shards", "cells_to_block", "map_source_genes", "merge_manifest"]
