"""GEARS' perturbation metrics (gears/inference.py), per perturbation and per test subgroup.

For perturbation p: x = mean true cell of p, x_hat = mean predicted cell of p (the mean of the
predictions for p's cells), c = mean control cell over *all* control cells, D = top-20 DE genes
(uns['rank_genes_groups_cov_all'][:20]), T = uns['top_non_dropout_de_20']:

    pearson        rho(x_hat, x)                       compute_metrics
    pearson_de     rho(x_hat[D], x[D])                 compute_metrics (batch.de_idx)
    mse, mse_de    mean squared error, all genes / D   compute_metrics
    pearson_delta       rho(x_hat - c, x - c)          deeper_analysis
    pearson_de_delta    rho on D of the deltas         deeper_analysis (GEARS calls it pearson_delta_de)
    frac_correct_direction_20  share of D where sign(x_hat - c) == sign(x - c)   deeper_analysis
    pearson_top20_de_non_dropout        rho(x_hat[T], x[T])              non_dropout_analysis
    pearson_delta_top20_de_non_dropout  rho on T of the deltas           non_dropout_analysis

rho is Pearson's r; GEARS replaces a NaN r (a constant vector: e.g. the control-mean baseline's
zero delta) by 0, and so do we. A subgroup's value is the mean over its perturbations.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

METRICS = ("pearson", "pearson_de", "mse", "mse_de", "pearson_delta", "pearson_de_delta",
           "pearson_top20_de_non_dropout", "pearson_delta_top20_de_non_dropout", "frac_correct_direction_20")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r in float64 (scipy.stats.pearsonr's value); 0 where it is undefined, as GEARS."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pearson: two 1-D vectors of one length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return 0.0
    da, db = a - a.mean(), b - b.mean()
    # scipy normalises each centred vector first (robust to scale); so do we.
    na, nb = np.linalg.norm(da), np.linalg.norm(db)
    if na == 0 or nb == 0 or not (math.isfinite(na) and math.isfinite(nb)):
        return 0.0
    r = float(np.dot(da / na, db / nb))
    return max(-1.0, min(1.0, r)) if math.isfinite(r) else 0.0


def mse(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.mean((a - b) ** 2))


def frac_correct_direction(pred: np.ndarray, truth: np.ndarray, ctrl: np.ndarray) -> float:
    """GEARS: |sign(pred - c) - sign(truth - c)| == 0, over the genes given (a zero counts as a sign)."""
    change = np.abs(np.sign(pred - ctrl) - np.sign(truth - ctrl))
    return float((change == 0).sum()) / len(change)


def perturbation_metrics(pred_mean: np.ndarray, true_mean: np.ndarray, ctrl_mean: np.ndarray,
                         de_idx: np.ndarray, non_dropout_idx: np.ndarray) -> dict[str, float]:
    """Every metric of METRICS for one perturbation (vectors over all genes, float64)."""
    pred_mean, true_mean, ctrl_mean = (np.asarray(v, dtype=np.float64) for v in (pred_mean, true_mean, ctrl_mean))
    if not (pred_mean.shape == true_mean.shape == ctrl_mean.shape):
        raise ValueError(f"pred {pred_mean.shape}, truth {true_mean.shape} and control {ctrl_mean.shape} differ")
    d_pred, d_true = pred_mean - ctrl_mean, true_mean - ctrl_mean
    de, nd = np.asarray(de_idx, dtype=np.int64), np.asarray(non_dropout_idx, dtype=np.int64)
    return {
        "pearson": pearson(pred_mean, true_mean),
        "pearson_de": pearson(pred_mean[de], true_mean[de]),
        "mse": mse(pred_mean, true_mean),
        "mse_de": mse(pred_mean[de], true_mean[de]),
        "pearson_delta": pearson(d_pred, d_true),
        "pearson_de_delta": pearson(d_pred[de], d_true[de]),
        "pearson_top20_de_non_dropout": pearson(pred_mean[nd], true_mean[nd]),
        "pearson_delta_top20_de_non_dropout": pearson(d_pred[nd], d_true[nd]),
        "frac_correct_direction_20": frac_correct_direction(pred_mean[de], true_mean[de], ctrl_mean[de]),
    }


def evaluate_predictions(data, predictions: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`predictions`: condition -> mean predicted cell [G] (or predicted cells [n, G], averaged
    here as GEARS does). Returns condition -> metrics, against `data` (a GearsData)."""
    ctrl = data.control_mean()
    out = {}
    for cond, pred in predictions.items():
        pred = np.asarray(pred, dtype=np.float64)
        pred_mean = pred.mean(axis=0) if pred.ndim == 2 else pred
        out[cond] = perturbation_metrics(pred_mean, data.mean(cond), ctrl, data.de_idx(cond),
                                         data.non_dropout_idx(cond))
    return out


def subgroup_means(per_pert: Mapping[str, Mapping[str, float]],
                   subgroups: Mapping[str, list[str]]) -> dict[str, dict[str, float]]:
    """subgroup -> metric -> mean over the subgroup's perturbations (empty subgroups left out)."""
    out = {}
    for group, perts in subgroups.items():
        present = [p for p in perts if p in per_pert]
        if not present:
            continue
        out[group] = {m: float(np.mean([per_pert[p][m] for p in present])) for m in METRICS}
        out[group]["n_perturbations"] = float(len(present))
    return out
