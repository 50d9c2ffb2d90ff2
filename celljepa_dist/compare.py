"""Side by side: the runs of one MLflow experiment (parameters that differ, final losses, evaluation
metrics) as markdown, their loss curves as a PNG, and the same comparison in MLflow's UI.

Read with MlflowClient only (no server needed). `compare_runs` gathers everything into a
`Comparison`; rendering and plotting are pure functions of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from celljepa_dist.atomic import atomic_write_text, save_png
from celljepa_dist.mlflow_ui import EVAL_PREFIXES, compare_runs_url

LOSS_PREFIX = "loss"
MISSING = "—"


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    # loss term -> [(step, value)] in step order: the full MLflow history (the PNG's lines).
    loss_history: dict[str, list[tuple[int, float]]]
    # eval/... and health/... -> latest value
    eval_metrics: dict[str, float]

    def final_loss(self, term: str) -> tuple[int, float] | None:
        """(step, value) of the last logged value of a loss term, None if the run never logged it."""
        history = self.loss_history.get(term)
        return history[-1] if history else None


@dataclass
class Comparison:
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    runs: list[RunSummary] = field(default_factory=list)

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    def differing_params(self) -> dict[str, list[str | None]]:
        """Parameter -> value per run (None where a run lacks it), for those not equal in all runs."""
        keys = sorted(set().union(*(r.params for r in self.runs)))
        values = {k: [r.params.get(k) for r in self.runs] for k in keys}
        return {k: v for k, v in values.items() if len(set(v)) > 1}

    def equal_param_count(self) -> int:
        keys = set().union(*(r.params for r in self.runs))
        return len(keys) - len(self.differing_params())

    def loss_terms(self) -> list[str]:
        """`loss` (the total) first, then its terms by name."""
        terms = set().union(*(r.loss_history for r in self.runs))
        return sorted(terms, key=lambda t: (t != LOSS_PREFIX, t))

    def eval_keys(self) -> list[str]:
        return sorted(set().union(*(r.eval_metrics for r in self.runs)), key=eval_sort_key)


def eval_sort_key(key: str) -> tuple:
    """`eval/{dataset}/{embedding}/{metric}` ordered by dataset, metric, then embedding, so the
    baseline's row (X_pca) sits beside the models' rows of the same metric."""
    parts = key.split("/")
    if len(parts) == 4:
        prefix, dataset, embedding, metric = parts
        return (prefix, dataset, metric, embedding)
    return (parts[0], key)


def _experiment(client, tracking_uri: str, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"experiment {experiment!r} not found in {tracking_uri}; "
                         f"existing experiments: {', '.join(names) or '(none)'}")
    return exp


def _selected_runs(client, tracking_uri: str, exp, run_ids: list[str] | None) -> list:
    from mlflow.exceptions import MlflowException

    if not run_ids:
        runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
        if not runs:
            raise ValueError(f"experiment {exp.name!r} (id {exp.experiment_id}) has no runs to compare")
        return runs
    runs = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"run {run_id!r} not found in {tracking_uri}") from None
        if run.info.experiment_id != exp.experiment_id:
            raise ValueError(f"run {run_id!r} belongs to experiment id {run.info.experiment_id}, "
                             f"not to {exp.name!r} (id {exp.experiment_id})")
        runs.append(run)
    return runs


def _summary(client, run) -> RunSummary:
    metrics = run.data.metrics
    history = {}
    for key in sorted(k for k in metrics if k.startswith(LOSS_PREFIX)):
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        # A resumed step logged twice keeps its latest value.
        history[key] = sorted({m.step: m.value for m in points}.items())
    return RunSummary(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, status=run.info.status,
                      params=dict(run.data.params), tags=dict(run.data.tags), loss_history=history,
                      eval_metrics={k: v for k, v in metrics.items() if k.startswith(EVAL_PREFIXES)})


def compare_runs(tracking_uri: str, experiment: str, run_ids: list[str] | None = None) -> Comparison:
    """Gather the runs of `experiment` (all of them, oldest first, or `run_ids` in that order)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _experiment(client, tracking_uri, experiment)
    runs = _selected_runs(client, tracking_uri, exp, run_ids)
    return Comparison(tracking_uri=tracking_uri, experiment_name=exp.name, experiment_id=exp.experiment_id,
                      runs=[_summary(client, r) for r in runs])


def _fmt(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _cell(text: str | None) -> str:
    return MISSING if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(comparison: Comparison) -> str:
    c = comparison
    run_cols = [f"{_cell(r.name)} (`{r.run_id[:8]}`)" for r in c.runs]
    out = [f"# Runs of `{c.experiment_name}` compared", "",
           f"Store: `{c.tracking_uri}`, experiment id {c.experiment_id}, {len(c.runs)} run(s).", ""]
    out += _table(["run", "run id", "status", "objective"],
                  [[_cell(r.name), f"`{r.run_id}`", r.status, _cell(r.tags.get("objective"))] for r in c.runs])

    differing = c.differing_params()
    out += ["", "## Parameters that differ", "",
            f"{len(differing)} differ, {c.equal_param_count()} are equal in all runs.", ""]
    if differing:
        out += _table(["parameter", *run_cols], [[f"`{k}`", *map(_cell, v)] for k, v in differing.items()])

    out += ["", "## Final losses", "", "Last logged value of each loss term (step in brackets).", ""]
    rows = []
    for term in c.loss_terms():
        finals = [r.final_loss(term) for r in c.runs]
        rows.append([f"`{term}`", *(MISSING if f is None else f"{_fmt(f[1])} (step {f[0]})" for f in finals)])
    out += _table(["loss", *run_cols], rows) if rows else ["No loss metrics logged."]

    out += ["", "## Evaluation metrics", ""]
    keys = c.eval_keys()
    if keys:
        out += _table(["metric", *run_cols], [[f"`{k}`", *(_fmt(r.eval_metrics.get(k)) for r in c.runs)]
                                              for k in keys])
    else:
        out += ["No `eval/...` or `health/...` metrics logged to these runs yet."]
    return "\n".join(out) + "\n"


def plot_loss_curves(comparison: Comparison, out_png: str | Path) -> Path:
    """One panel per loss term, one line per run (MLflow's metric histories)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = comparison.loss_terms()
    if not terms:
        raise ValueError(f"no loss metrics in the runs {', '.join(comparison.run_ids)}: nothing to plot")
    fig, axes = plt.subplots(1, len(terms), figsize=(4.5 * len(terms), 3.4), squeeze=False)
    for ax, term in zip(axes[0], terms):
        positive = True
        for run in comparison.runs:
            points = run.loss_history.get(term)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=run.name, lw=1, marker="." if len(points) < 30 else None)
                positive &= all(v > 0 and math.isfinite(v) for v in values)
        ax.set_title(term)
        ax.set_xlabel("optimiser step")
        if positive:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{comparison.experiment_name}: loss curves", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out_png, dpi=110)


def write_comparison(comparison: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """`out_dir/comparison.md` and `out_dir/loss_curves.png` (when the runs logged losses)."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "comparison.md"}
    atomic_write_text(paths["markdown"], render_markdown(comparison))
    if comparison.loss_terms():
        paths["loss_curves"] = plot_loss_curves(comparison, out_dir / "loss_curves.png")
    return paths


def compare_url(base_url: str, comparison: Comparison) -> str:
    """The same runs in MLflow's compare view (served by e.g. launch/mlflow_ui.py at `base_url`)."""
    return compare_runs_url(base_url, comparison.run_ids, [comparison.experiment_id])
