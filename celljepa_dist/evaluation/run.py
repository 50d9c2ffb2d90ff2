"""Evaluation orchestration: embeddings (+ baseline) -> metrics, an h5ad -> report files, MLflow.

MLflow naming is a contract (compare_runs reads every metric whose name starts with `eval/`):
metrics `eval/{dataset}/{embedding_key}/{metric}`, artifacts under `eval/{dataset}/`.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
from tqdm import tqdm

from celljepa_dist.data.h5ad import read_h5ad
from celljepa_dist.evaluation.baselines import BASELINE_KEYS, compute_baseline
from celljepa_dist.evaluation.metrics import (
    check_label_classes,
    check_labels,
    embedding_metrics,
    get_embedding,
    neighbors_key,
    progress_enabled,
)

# Notes for the report (label key, batch key, how the baseline used X) travel with the AnnData.
UNS_NOTES = "celljepa_eval"
# MLflow's rule for metric names (mlflow.utils.validation) minus "/": a dataset or embedding key with
# a slash would break the 4-part eval/{dataset}/{embedding_key}/{metric} that compare_runs splits.
_NAME_PART = re.compile(r"^[\w.\- ]+$")


def _store_graph(adata: ad.AnnData, graph: ad.AnnData, embedding_key: str) -> None:
    """Copy scanpy's default-key graph into adata under neighbors_key(...), as key_added would."""
    key = neighbors_key(embedding_key)
    params = dict(graph.uns["neighbors"])
    params["connectivities_key"] = f"{key}_connectivities"
    params["distances_key"] = f"{key}_distances"
    adata.uns[key] = params
    adata.obsp[params["connectivities_key"]] = graph.obsp["connectivities"]
    adata.obsp[params["distances_key"]] = graph.obsp["distances"]


def evaluate_embeddings(adata: ad.AnnData, label_key: str, embedding_keys: list[str],
                        baseline: str | None = "pca", batch_key: str | None = None,
                        source: str = "") -> dict[str, dict[str, float]]:
    """scib 1.1.5 NMI/ARI/ASW/AvgBIO per embedding (baseline first), see evaluation/metrics.py.

    Adds to adata: obsm["X_pca"] when baseline="pca", each embedding's kNN graph (uns/obsp
    `neighbors_{key}`; write_report reuses it for the UMAP) and uns["celljepa_eval"] notes.
    `source` (e.g. the h5ad path) is named in error messages. All inputs are checked before any
    clustering starts.
    """
    embedding_keys = list(embedding_keys)
    if not embedding_keys and baseline is None:
        raise ValueError("nothing to evaluate: no embedding keys and no baseline")
    if baseline is not None and baseline not in BASELINE_KEYS:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {sorted(BASELINE_KEYS)} or None")
    if len(set(embedding_keys)) != len(embedding_keys):
        raise ValueError(f"embedding keys repeated: {embedding_keys}")
    if baseline is not None and BASELINE_KEYS.get(baseline) in embedding_keys:
        raise ValueError(f"embedding key {BASELINE_KEYS[baseline]!r} is where the {baseline} baseline is "
                         f"stored; rename that embedding or pass baseline=None")
    labels = check_labels(adata, label_key, source)
    check_label_classes(labels, label_key, source)
    batches = check_labels(adata, batch_key, source, what="batch") if batch_key is not None else None
    embeddings = {key: get_embedding(adata, key, source) for key in embedding_keys}

    notes = {"label_key": label_key, "batch_key": batch_key or "", "baseline_note": "", "source": str(source)}
    if baseline is not None:
        base = compute_baseline(baseline, adata, source)
        adata.obsm[base.key] = base.embedding
        embeddings = {base.key: base.embedding, **embeddings}
        notes["baseline_note"] = base.note
    adata.uns[UNS_NOTES] = notes

    results: dict[str, dict[str, float]] = {}
    progress = progress_enabled()
    for key, embedding in tqdm(embeddings.items(), desc="embeddings", disable=not progress):
        scores, graph = embedding_metrics(embedding, labels, key, batches, progress=progress)
        _store_graph(adata, graph, key)
        results[key] = scores
    if baseline is not None:
        base_key = BASELINE_KEYS[baseline]
        for key in embedding_keys:
            results[key]["avgbio_vs_baseline"] = results[key]["avgbio"] - results[base_key]["avgbio"]
    return results


def metric_name(dataset: str, embedding_key: str, metric: str) -> str:
    return f"eval/{dataset}/{embedding_key}/{metric}"


def check_metric_names(dataset: str, embedding_keys: Iterable[str]) -> None:
    """Names MLflow (or the eval/ naming contract) would refuse: fail before the evaluation, not after."""
    for part, what in [(dataset, "dataset name"), *((k, "embedding key") for k in embedding_keys)]:
        if not _NAME_PART.match(part):
            raise ValueError(f"{what} {part!r} cannot be part of the MLflow metric name "
                             f"eval/{{dataset}}/{{embedding_key}}/{{metric}} "
                             f"(allowed: letters, digits, _ - . and space)")


def _artifact_paths(artifacts: Mapping[str, Path] | Iterable[str | os.PathLike] | None) -> list[Path]:
    if artifacts is None:
        return []
    values = artifacts.values() if isinstance(artifacts, Mapping) else artifacts
    return [Path(p) for p in values]


def log_to_mlflow(results: Mapping[str, Mapping[str, float]], run_id: str, tracking_uri: str, dataset: str,
                  artifacts: Mapping[str, Path] | Iterable[str | os.PathLike] | None = None) -> int:
    """Log every finite metric to an existing run as eval/{dataset}/{key}/{metric} (step 0) and the
    artifacts (e.g. write_report's metrics.md and umap.png) under eval/{dataset}/. Returns the number
    of metrics logged. NaN metrics (a batch ASW with no mixed label) are left out."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    check_metric_names(dataset, results.keys())
    check_mlflow_run(run_id, tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    timestamp = int(time.time() * 1000)
    metrics = [Metric(metric_name(dataset, key, name), float(value), timestamp, 0)
               for key, scores in results.items() for name, value in scores.items()
               if isinstance(value, (int, float)) and math.isfinite(value)]
    for start in range(0, len(metrics), 1000):  # log_batch's per-call limit
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for path in _artifact_paths(artifacts):
        client.log_artifact(run_id, str(path), artifact_path=f"eval/{dataset}")
    return len(metrics)


def check_mlflow_run(run_id: str, tracking_uri: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"MLflow run {run_id!r} not found at tracking URI {tracking_uri}: {e.message}") from None


@dataclass
class EvaluationConfig:
    """What launch/evaluate.py asks for; validate() checks without changing anything."""

    h5ad: str
    label_key: str
    embedding_keys: list[str] = field(default_factory=list)
    out: str = "eval_out"
    baseline: str | None = "pca"
    batch_key: str | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    dataset_name: str | None = None

    @property
    def dataset(self) -> str:
        return self.dataset_name or Path(self.h5ad).stem

    def resolved_tracking_uri(self) -> str | None:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    def validate(self) -> None:
        if not Path(self.h5ad).is_file():
            raise ValueError(f"h5ad file not found: {self.h5ad}")
        if not self.embedding_keys and self.baseline is None:
            raise ValueError("nothing to evaluate: give --embedding-key and/or --baseline")
        if self.baseline is not None and self.baseline not in BASELINE_KEYS:
            raise ValueError(f"unknown baseline {self.baseline!r}; choose from {sorted(BASELINE_KEYS)}")
        if self.mlflow_run_id is not None:
            if self.resolved_tracking_uri() is None:
                raise ValueError("--mlflow-run-id needs --tracking-uri or the MLFLOW_TRACKING_URI environment variable")
            check_metric_names(self.dataset, self.embedding_keys)


@dataclass(frozen=True)
class EvaluationOutput:
    results: dict[str, dict[str, float]]
    files: dict[str, Path]
    markdown: str
    n_logged: int


def evaluate_h5ad(cfg: EvaluationConfig) -> EvaluationOutput:
    """The CLI's work: read, check (and check the MLflow run) first, evaluate, write, log."""
    from celljepa_dist.evaluation.report import write_report

    cfg.validate()
    if cfg.mlflow_run_id is not None:
        check_mlflow_run(cfg.mlflow_run_id, cfg.resolved_tracking_uri())
    adata = read_h5ad(cfg.h5ad)  # errors name the file: missing, a directory, truncated, not HDF5
    results = evaluate_embeddings(adata, cfg.label_key, cfg.embedding_keys, cfg.baseline, cfg.batch_key,
                                  source=cfg.h5ad)
    files = write_report(results, adata, cfg.label_key, cfg.out)
    n_logged = 0
    if cfg.mlflow_run_id is not None:
        # metrics.json is left out: its numbers are the run's metrics already.
        artifacts = [files["metrics.md"], files["umap.png"]]
        n_logged = log_to_mlflow(results, cfg.mlflow_run_id, cfg.resolved_tracking_uri(), cfg.dataset, artifacts)
    return EvaluationOutput(results, files, files["metrics.md"].read_text(encoding="utf-8"), n_logged)
