"""Representation health of a set of cell embeddings, and when it counts as collapse.

Pure functions of one [n, d] matrix of `<cls>` embeddings (numpy array or torch tensor, any float
dtype; computed in float64). No labels needed, so they can be watched during pre-training
(train/health_probe.py) on a fixed probe set of cells.

Which matrix each metric looks at (docs/health.md):
  rankme    RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of
            the RAW (uncentred, unnormalised) matrix, as the paper defines it. Between 1 (all rows
            parallel) and min(n, d) (all singular values equal).
  mean_cos  mean cosine similarity over all ordered pairs of distinct cells (the diagonal left out).
  dim_std   mean over the d dimensions of the standard deviation across cells (ddof=0) of the
            L2-normalised rows (SimSiam's collapse monitor): 0 for a collapsed set, about
            1/sqrt(d) for directions spread evenly over the sphere.
  top3_var  fraction of the variance of the L2-normalised rows (centred, i.e. PCA as the evaluation
            would run it on zero-shot embeddings, which are L2-normalised) in the top 3 principal
            components; 1.0 when there is no variance at all.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

RANKME_EPS = 1e-7  # Garrido et al.: p_k = s_k / ||s||_1 + eps
NORM_EPS = 1e-12  # rows shorter than this count as zero vectors (cosine 0 with everything)
TOP_PCS = 3
METRIC_NAMES = ("rankme", "mean_cos", "dim_std", "top3_var")


def as_matrix(embeddings) -> np.ndarray:
    """[n, d] float64 copy of a numpy array or torch tensor; errors name the shape at fault."""
    if hasattr(embeddings, "detach"):  # torch, without importing it here
        embeddings = embeddings.detach().float().cpu().numpy()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"health metrics need an [n, d] matrix of embeddings, got shape {x.shape}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"health metrics need at least 2 cells and 1 dimension, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"embeddings of {len(bad)} cell(s) are not finite (rows {bad[:5].tolist()}...)")
    return x


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, NORM_EPS)


def effective_rank(embeddings, eps: float = RANKME_EPS) -> float:
    """RankMe of the raw matrix: exp(-sum_k p_k log p_k), p_k = s_k / sum(s) + eps."""
    s = np.linalg.svd(as_matrix(embeddings), compute_uv=False)
    total = s.sum()
    if total <= 0:  # the zero matrix has no direction at all
        return 0.0
    p = s / total + eps
    return float(math.exp(-np.sum(p * np.log(p))))


def mean_pairwise_cosine(embeddings) -> float:
    """Mean of cos(x_i, x_j) over the n(n-1) ordered pairs i != j."""
    u = l2_normalise(as_matrix(embeddings))
    n = u.shape[0]
    # sum_{i,j} u_i.u_j = |sum_i u_i|^2; minus the diagonal (|u_i|^2: 1, or 0 for a zero row).
    total = float(np.sum(u.sum(axis=0) ** 2)) - float(np.sum(u * u))
    return float(np.clip(total / (n * (n - 1)), -1.0, 1.0))  # rounding must not push it past a cosine's range


def mean_dim_std(embeddings) -> float:
    """Mean over dimensions of the per-dimension std (ddof=0) of the L2-normalised rows."""
    return float(np.std(l2_normalise(as_matrix(embeddings)), axis=0).mean())


def top_pc_variance_fraction(embeddings, k: int = TOP_PCS) -> float:
    """Share of the total variance of the L2-normalised rows in their top-k principal components."""
    u = l2_normalise(as_matrix(embeddings))
    s = np.linalg.svd(u - u.mean(axis=0), compute_uv=False)
    var = s ** 2
    total = var.sum()
    if total <= 1e-24:  # no variance: every bit of it (none) is in any direction
        return 1.0
    return float(var[:k].sum() / total)


@dataclass(frozen=True)
class HealthMetrics:
    n_cells: int
    dim: int
    rankme: float
    mean_cos: float
    dim_std: float
    top3_var: float

    def as_dict(self) -> dict[str, float]:
        """The four metrics (what is logged), without the shape."""
        return {k: getattr(self, k) for k in METRIC_NAMES}


def health_metrics(embeddings) -> HealthMetrics:
    x = as_matrix(embeddings)
    return HealthMetrics(n_cells=x.shape[0], dim=x.shape[1], rankme=effective_rank(x),
                         mean_cos=mean_pairwise_cosine(x), dim_std=mean_dim_std(x),
                         top3_var=top_pc_variance_fraction(x))


def jepa_prediction_cosine(predicted, target) -> float:
    """Mean over cells of cos(predictor(student <cls> of the masked view), teacher <cls>)."""
    p, t = l2_normalise(as_matrix(predicted)), l2_normalise(as_matrix(target))
    if p.shape != t.shape:
        raise ValueError(f"predictions {p.shape} and targets {t.shape} differ in shape")
    return float(np.sum(p * t, axis=1).mean())


@dataclass(frozen=True)
class HealthThresholds:
    """Where a metric counts as collapse (docs/health.md gives the reasons and measured values).

    rankme is judged relative to its ceiling min(n, d); dim_std relative to 1/sqrt(d), its value
    for directions spread evenly over the sphere."""

    min_rankme_fraction: float = 0.05  # rankme / min(n, d)
    max_mean_cos: float = 0.9
    min_dim_std_ratio: float = 0.3  # dim_std * sqrt(d)
    max_top3_var: float = 0.9

    def validate(self, where: str = "tracking.health_thresholds") -> None:
        """Raises ValueError naming `where.field`; pure (the dataclass is frozen)."""
        checks = {"min_rankme_fraction": (0.0, 1.0), "max_mean_cos": (-1.0, 1.0),
                  "min_dim_std_ratio": (0.0, 1.0), "max_top3_var": (0.0, 1.0)}
        for name, (lo, hi) in checks.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and lo <= value <= hi):
                raise ValueError(f"{where}.{name} must be in [{lo}, {hi}], got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def threshold_values(thresholds: HealthThresholds, n_cells: int, dim: int) -> dict[str, tuple[str, float]]:
    """metric -> ("min" | "max", absolute threshold) for embeddings of `n_cells` x `dim`."""
    return {"rankme": ("min", thresholds.min_rankme_fraction * min(n_cells, dim)),
            "mean_cos": ("max", thresholds.max_mean_cos),
            "dim_std": ("min", thresholds.min_dim_std_ratio / math.sqrt(dim)),
            "top3_var": ("max", thresholds.max_top3_var)}


_RULES = {"rankme": "min_rankme_fraction x min(n, d)", "mean_cos": "max_mean_cos",
          "dim_std": "min_dim_std_ratio / sqrt(d)", "top3_var": "max_top3_var"}


def collapse_warnings(metrics: HealthMetrics, thresholds: HealthThresholds, what: str = "embeddings") -> list[str]:
    """One line per metric past its threshold, naming the metric, value and threshold; [] if healthy."""
    out = []
    for name, (kind, limit) in threshold_values(thresholds, metrics.n_cells, metrics.dim).items():
        value = getattr(metrics, name)
        crossed = value < limit if kind == "min" else value > limit
        if crossed:
            out.append(f"{what}: {name} = {value:.4g} {'<' if kind == 'min' else '>'} {limit:.4g} "
                       f"({_RULES[name]}; n={metrics.n_cells}, d={metrics.dim})")
    return out
