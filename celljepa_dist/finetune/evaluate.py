"""The end of a finetuning run (rank 0): embed the validation cells and all cells with the
finetuned model (and zero-shot with the init, the "before"), AvgBIO beside a PCA of the same
cells, report files and UMAP PNGs, MLflow.

    RUN_DIR/embedded.h5ad          every cell, obs[split], obsm[X_finetuned, X_zero_shot, ...]
    RUN_DIR/eval/{val,all}/        metrics.json, metrics.md, umap.png (evaluation/report.py)
    MLflow (the finetuning run)    eval/{dataset}_{val|all}/{embedding}/{nmi,ari,asw,avgbio}

Embeddings (unit rows, the embedding CLI's tokenisation): `X_finetuned` is the finetuned
student's `<cls>`, the encoder the supervised objective trains; with a teacher (celljepa) its EMA
copy is `X_finetuned_teacher`; `X_zero_shot` is the init's default encoder (its teacher when it
has one), as zero-shot evaluation embeds. Only labelled cells are evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("val", "all")
FINETUNED, FINETUNED_TEACHER, ZERO_SHOT = "X_finetuned", "X_finetuned_teacher", "X_zero_shot"


@dataclass
class FinetuneEvaluation:
    results: dict[str, dict[str, dict[str, float]]]  # split -> embedding key -> metric
    files: dict[str, dict[str, Path]]  # split -> report files
    embedded: Path

    def avgbio(self, split: str, key: str) -> float:
        return float(self.results[split][key]["avgbio"])


def embed_all(adata, model_dir: Path, init_dir: Path, has_teacher: bool, data_cfg, batch_size: int) -> dict[str, np.ndarray]:
    from celljepa_dist.zero_shot import EmbeddingConfig, embed_anndata

    def one(directory: Path, encoder: str | None) -> np.ndarray:
        cfg = EmbeddingConfig(encoder=encoder, batch_size=batch_size, gene_key=data_cfg.gene_key, layer=data_cfg.layer,
                              min_vocab_fraction=data_cfg.min_vocab_fraction, max_genes=data_cfg.max_genes,
                              progress=False)
        return embed_anndata(directory, adata, cfg, where=str(data_cfg.h5ad)).embeddings

    out = {FINETUNED: one(model_dir, "student")}
    if has_teacher:
        out[FINETUNED_TEACHER] = one(model_dir, "teacher")
    out[ZERO_SHOT] = one(init_dir, None)
    return out


def evaluate_finetuned(adata, split_of_row: np.ndarray, embeddings: dict[str, np.ndarray], label_key: str,
                       run_dir: Path, dataset: str, mlflow_run_id: str | None = None,
                       tracking_uri: str | None = None) -> FinetuneEvaluation:
    """AvgBIO of every embedding beside PCA on the validation cells and on all cells (labelled ones)."""
    import pandas as pd

    from celljepa_dist.evaluation import evaluate_embeddings, log_to_mlflow, write_report
    from celljepa_dist.zero_shot import write_h5ad_atomic

    adata = adata.copy()
    adata.obs["split"] = pd.Categorical(split_of_row)
    for key, emb in embeddings.items():
        adata.obsm[key] = emb
    embedded = write_h5ad_atomic(adata, run_dir / "embedded.h5ad")
    labelled = ~adata.obs[label_key].isna().to_numpy() & (adata.obs[label_key].astype(str).to_numpy() != "")
    results, files = {}, {}
    for split in SPLITS:
        rows = labelled & ((split_of_row == "val") if split == "val" else True)
        sub = adata[rows].copy()
        sub.obs[label_key] = sub.obs[label_key].astype(str)
        source = f"{dataset} ({split} cells)"
        results[split] = evaluate_embeddings(sub, label_key, list(embeddings), baseline="pca", source=source)
        files[split] = write_report(results[split], sub, label_key, run_dir / "eval" / split)
        if mlflow_run_id is not None and tracking_uri:
            log_to_mlflow(results[split], mlflow_run_id, tracking_uri, f"{dataset}_{split}",
                          artifacts=[files[split]["metrics.md"], files[split]["umap.png"]])
    return FinetuneEvaluation(results, files, embedded)
