"""Outputs of a perturbation evaluation, every file atomic:

    perturb_metrics.json   {method: {subgroup: {metric: value}}} (models and baselines alike)
    perturb_metrics.md     one table per headline metric: methods x subgroups, the best method of
                           each subgroup in bold, and whether each model beats the best baseline
    perturb_deltas.png     predicted vs true delta (vs the mean control cell) over all genes, for a
                           few held-out perturbations, one panel each, every method in its colour
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from celljepa_dist.atomic import atomic_write_text, save_png

from .baselines import BASELINES
from .split import SUBGROUPS

METRICS_JSON, METRICS_MD, DELTAS_PNG = "perturb_metrics.json", "perturb_metrics.md", "perturb_deltas.png"
TABLE_METRICS = ("pearson", "pearson_de", "pearson_delta", "pearson_de_delta", "pearson_top20_de_non_dropout",
                 "pearson_delta_top20_de_non_dropout", "frac_correct_direction_20", "mse", "mse_de")
LOWER_IS_BETTER = {"mse", "mse_de"}


def _fmt(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def best_baseline(results: dict, subgroup: str, metric: str) -> tuple[str | None, float | None]:
    """(name, value) of the baseline that scores best on `metric` in `subgroup`."""
    scores = {b: results[b][subgroup][metric] for b in BASELINES if subgroup in results.get(b, {})}
    if not scores:
        return None, None
    pick = min if metric in LOWER_IS_BETTER else max
    name = pick(scores, key=scores.get)
    return name, scores[name]


def markdown_table(results: dict, models: list[str]) -> str:
    groups = [g for g in SUBGROUPS if any(g in r for r in results.values())]
    methods = models + [b for b in BASELINES if b in results]
    lines = ["# Perturbation prediction (GEARS metrics, simulation split)", "",
             "Per subgroup: the mean over its held-out perturbations. Baselines use the training perturbations only "
             "(docs/perturbation.md). Bold: the best method of the column.", ""]
    for metric in TABLE_METRICS:
        pick = min if metric in LOWER_IS_BETTER else max
        lines += [f"## {metric}", "", "| method | " + " | ".join(groups) + " |",
                  "| --- | " + " | ".join("---" for _ in groups) + " |"]
        best = {g: pick((results[m][g][metric] for m in methods if g in results[m]), default=None) for g in groups}
        for m in methods:
            cells = []
            for g in groups:
                v = results[m].get(g, {}).get(metric)
                cells.append(f"**{_fmt(v)}**" if v is not None and v == best[g] else _fmt(v))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Models against the best baseline (pearson_delta)", ""]
    for m in models:
        for g in groups:
            if g not in results[m]:
                continue
            name, value = best_baseline(results, g, "pearson_delta")
            mine = results[m][g]["pearson_delta"]
            verdict = "beats" if value is None or mine > value else "LOSES TO"
            lines.append(f"- {m}, {g}: {_fmt(mine)} {verdict} the best baseline {name} ({_fmt(value)})")
    n = {g: int(next(r[g]["n_perturbations"] for r in results.values() if g in r)) for g in groups}
    lines += ["", "Perturbations per subgroup: " + ", ".join(f"{g} {k}" for g, k in n.items()), ""]
    return "\n".join(lines)


def write_metrics(out_dir: str | Path, results: dict, models: list[str]) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / METRICS_JSON, json.dumps(results, indent=1, sort_keys=True))
    atomic_write_text(out_dir / METRICS_MD, markdown_table(results, models))
    return out_dir / METRICS_JSON, out_dir / METRICS_MD


def shown_perturbations(test_subgroups: dict[str, list[str]]) -> dict[str, str]:
    """The first perturbation of each non-empty test subgroup -> its subgroup (the PNG's panels)."""
    return {perts[0]: g for g in SUBGROUPS if (perts := test_subgroups.get(g))}


def plot_deltas(path: str | Path, truth: dict, ctrl: np.ndarray, predictions: dict[str, dict], perts: list[str],
                labels: dict[str, str] | None = None) -> Path:
    """One panel per perturbation: x = true delta, y = predicted delta, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(perts), figsize=(4 * len(perts), 4), squeeze=False)
    for ax, p in zip(axes[0], perts):
        d_true = truth[p] - ctrl
        lim = float(np.abs(d_true).max()) * 1.1 or 1.0
        for method, preds in predictions.items():
            ax.scatter(d_true, preds[p] - ctrl, s=6, alpha=0.6, label=method)
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(f"{labels[p]}: {p}" if labels and p in labels else p, fontsize=9)
        ax.set_xlabel("true delta vs control")
    axes[0][0].set_ylabel("predicted delta vs control")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_png(fig, path)
