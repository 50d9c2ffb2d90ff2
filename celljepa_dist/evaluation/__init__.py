"""Embedding evaluation: AvgBIO (NMI, ARI, label ASW) exactly as scib 1.1.5 / scGPT, a PCA baseline
beside every model, report files and MLflow logging. See docs/evaluation.md."""
from __future__ import annotations

from celljepa_dist.evaluation.report import markdown_table, write_report
from celljepa_dist.evaluation.run import (
    EvaluationConfig,
    EvaluationOutput,
    evaluate_embeddings,
    evaluate_h5ad,
    log_to_mlflow,
    metric_name,
)

__all__ = ["EvaluationConfig", "EvaluationOutput", "evaluate_embeddings", "evaluate_h5ad", "log_to_mlflow",
           "markdown_table", "metric_name", "write_report"]
