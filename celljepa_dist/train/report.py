"""Run summaries people look at: per-step loss curves of one or more runs, and the
representation-health curves of one run (train/health_probe.py), as PNGs."""
from __future__ import annotations

import json
from pathlib import Path

from celljepa_dist.atomic import save_png

HEALTH_METRICS = ("rankme", "mean_cos", "dim_std", "top3_var")


def read_losses(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "losses.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no per-step losses (has the run committed a checkpoint?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_loss_curves(runs: dict[str, str | Path], out_png: str | Path) -> Path:
    """One panel per loss term; one line per run (e.g. celljepa vs scgpt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {name: read_losses(d) for name, d in runs.items()}
    terms = [t for t in ("loss_rec", "loss_jepa", "loss_mvc", "loss_var", "loss_cov", "loss")
             if any(t in r[0] for r in records.values() if r)]
    fig, axes = plt.subplots(1, len(terms), figsize=(4.5 * len(terms), 3.4), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for name, recs in records.items():
            pts = [(r["step"], r[term]) for r in recs if term in r]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1)
        ax.set_title(term)
        ax.set_xlabel("optimiser step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    return _save(fig, out_png)


def _save(fig, out_png: str | Path) -> Path:

    return save_png(fig, out_png, dpi=110)


def read_health(run_dir: str | Path) -> list[dict]:
    """`run_dir/health.jsonl` records ({"step", "student/rankme", ..., "jepa_pred_cos", "warnings"}),
    [] when the run measured no health (tracking.probe_shards unset)."""
    path = Path(run_dir) / "health.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def health_thresholds_of_run(run_dir: str | Path) -> dict[str, tuple[str, float]]:
    """The absolute collapse thresholds the run used (from its config.yaml), {} without one."""
    from celljepa_dist.config import load_config
    from celljepa_dist.health import threshold_values

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return {}
    cfg = load_config(path)
    return threshold_values(cfg.tracking.health_thresholds, cfg.tracking.probe_cells, cfg.model.d_model)


def plot_health(records: list[dict], out_png: str | Path, thresholds: dict[str, tuple[str, float]] | None = None,
                title: str = "") -> Path:
    """One panel per health metric (student and teacher lines, the collapse threshold dashed),
    plus the JEPA prediction cosine when logged; steps with warnings marked in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError(f"no health records to plot into {out_png}")
    panels = list(HEALTH_METRICS) + (["jepa_pred_cos"] if any("jepa_pred_cos" in r for r in records) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    warned = [r["step"] for r in records if r.get("warnings", 0) > 0]
    for ax, metric in zip(axes[0], panels):
        for encoder in ("student", "teacher") if metric in HEALTH_METRICS else ("",):
            key = f"{encoder}/{metric}" if encoder else metric
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), label=encoder or metric, lw=1, marker="." if len(pts) < 30 else None)
        if thresholds and metric in thresholds:
            kind, limit = thresholds[metric]
            ax.axhline(limit, color="red", ls="--", lw=0.8, label=f"collapse ({kind} {limit:.3g})")
        for step in warned:
            ax.axvline(step, color="red", alpha=0.15, lw=2)
        ax.set_title(metric)
        ax.set_xlabel("optimiser step")
        ax.legend(fontsize=7)
    fig.suptitle(title or "representation health of the probe cells' <cls> (red bands: collapse warnings)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_run_health(run_dir: str | Path) -> Path | None:
    """`run_dir/health.png` from `run_dir/health.jsonl` and the run's thresholds; None without records."""
    run_dir = Path(run_dir)
    records = read_health(run_dir)
    if not records:
        return None
    return plot_health(records, run_dir / "health.png", health_thresholds_of_run(run_dir),
                       title=f"{run_dir.name}: health of the probe cells' <cls> (red bands: collapse warnings)")
