"""Run summaries people look at: per-step loss curves of one or more runs as a PNG."""
from __future__ import annotations

import json
from pathlib import Path


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
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
