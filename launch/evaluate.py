"""Embedding quality (NMI, ARI, ASW, AvgBIO as scib 1.1.5 / scGPT) of obsm embeddings of an h5ad,
beside a PCA baseline; writes OUT/metrics.json, OUT/metrics.md (printed) and OUT/umap.png.

    python launch/evaluate.py --h5ad F --label-key K --embedding-key X [--embedding-key Y ...]
        [--baseline pca] [--batch-key B] --out DIR
        [--mlflow-run-id ID] [--tracking-uri URI] [--dataset-name NAME]
With --mlflow-run-id, every metric goes to that existing run as eval/{dataset}/{embedding_key}/{metric}
(dataset = --dataset-name or the h5ad file stem) and metrics.md + umap.png as artifacts under eval/{dataset}.
"""
from __future__ import annotations

import argparse
import sys
import warnings

# louvain 0.8 warns on import that pkg_resources is deprecated: noise for the user, not ours to fix.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

from celljepa_dist.evaluation.run import EvaluationConfig, evaluate_h5ad  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5ad", required=True)
    p.add_argument("--label-key", required=True, help="obs column with the cell types")
    p.add_argument("--embedding-key", action="append", default=[], help="obsm key (repeatable)")
    p.add_argument("--baseline", choices=["pca", "none"], default="pca",
                   help="baseline embedding computed from X (default pca; 'none' to skip)")
    p.add_argument("--batch-key", default=None, help="obs column: also report scib's batch ASW")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mlflow-run-id", default=None, help="existing MLflow run to log the metrics to")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--dataset-name", default=None, help="dataset part of the metric names (default: file stem)")
    args = p.parse_args(argv)
    cfg = EvaluationConfig(h5ad=args.h5ad, label_key=args.label_key, embedding_keys=args.embedding_key,
                           out=args.out, baseline=None if args.baseline == "none" else args.baseline,
                           batch_key=args.batch_key, mlflow_run_id=args.mlflow_run_id,
                           tracking_uri=args.tracking_uri, dataset_name=args.dataset_name)
    try:
        output = evaluate_h5ad(cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"evaluate: error: {message}", file=sys.stderr)
        return 2
    print(output.markdown, end="")
    print(f"wrote {', '.join(str(p) for p in output.files.values())}")
    if cfg.mlflow_run_id is not None:
        print(f"logged {output.n_logged} metrics to MLflow run {cfg.mlflow_run_id} as eval/{cfg.dataset}/...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
