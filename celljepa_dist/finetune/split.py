"""The train/validation split of a labelled dataset: stratified by label, a pure function of
(labels, fraction, seed), saved with the run (`RUN_DIR/split.csv`).

Per label with n cells, n_val = min(n - 1, max(1, round(fraction * n))) cells go to validation:
every label is on both sides (a label with one cell cannot be; `check_label_counts` refuses it
before any split), so validation AvgBIO sees every type and ECS trains on every type. Which cells
of a label go where is a permutation drawn from numpy's PCG64 seeded with (tag, seed, label
index): identical on every machine, independent of the other labels. Cells without a label
(code -1) are split the same way, as their own stratum, and stay unlabelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from celljepa_dist.atomic import atomic_write_text

SPLIT_FILE = "split.csv"
_SPLIT_TAG = 0x53504C  # keeps this stream apart from the data order's (data/order.py)
TRAIN, VAL = "train", "val"


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # int64 row indices, ascending
    val: np.ndarray  # int64 row indices, ascending

    def assignment(self, n: int) -> np.ndarray:
        """"train"/"val" per row."""
        out = np.empty(n, dtype=object)
        out[self.train], out[self.val] = TRAIN, VAL
        return out


def n_validation(n: int, fraction: float) -> int:
    """Validation cells of a label with n >= 2 cells: at least one, never all."""
    return int(min(n - 1, max(1, round(fraction * n))))


def check_label_counts(codes: np.ndarray, names: Sequence[str], label_key: str, where: str) -> None:
    """A label with a single cell cannot be on both sides of a stratified split: name it."""
    codes = np.asarray(codes)
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    lonely = [str(names[i]) for i in np.flatnonzero(counts == 1)]
    if lonely:
        raise ValueError(f"{where}: obs[{label_key!r}] label(s) {lonely} have a single cell: a stratified "
                         "train/validation split needs >= 2 cells per label (drop those cells, merge the label "
                         "into another, or mark it unknown with an empty value)")


def stratified_split(codes: np.ndarray, fraction: float, seed: int) -> Split:
    """codes: int label per cell (-1 unknown). Pure; raises on a label with one cell."""
    codes = np.asarray(codes, dtype=np.int64)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction={fraction}: must be in (0, 1)")
    val_parts = []
    for label in np.unique(codes):
        rows = np.flatnonzero(codes == label)
        if len(rows) < 2:
            if label < 0:
                continue  # one unknown cell: it trains (no label, so no ECS term)
            raise ValueError(f"label code {label} has {len(rows)} cell: needs >= 2 for a stratified split")
        stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_SPLIT_TAG, seed, int(label) + 1])))
        val_parts.append(rows[stream.permutation(len(rows))[:n_validation(len(rows), fraction)]])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    is_val = np.zeros(len(codes), bool)
    is_val[val] = True
    return Split(train=np.flatnonzero(~is_val).astype(np.int64), val=val.astype(np.int64))


def split_frame(split: Split, obs_names: Sequence[str], labels: Sequence[str]) -> pd.DataFrame:
    n = len(obs_names)
    return pd.DataFrame({"row": np.arange(n), "obs_name": list(obs_names), "label": list(labels),
                         "split": split.assignment(n)})


def write_split(path: Path, split: Split, obs_names: Sequence[str], labels: Sequence[str]) -> Path:
    """RUN_DIR/split.csv: row, obs_name, label, split (atomic)."""
    atomic_write_text(path, split_frame(split, obs_names, labels).to_csv(index=False))
    return path


def check_saved_split(path: Path, split: Split, obs_names: Sequence[str], labels: Sequence[str]) -> None:
    """A resumed run's split.csv must be the one this run computes (same cells on each side)."""
    saved = pd.read_csv(path, dtype={"obs_name": str, "label": str, "split": str}, keep_default_na=False)
    now = split_frame(split, obs_names, labels).astype({"label": str})
    if len(saved) != len(now) or not (saved["obs_name"].to_numpy() == now["obs_name"].to_numpy()).all() \
            or not (saved["split"].to_numpy() == now["split"].to_numpy()).all():
        raise ValueError(f"{path}: the saved train/validation split differs from the one this run computes "
                         "(another h5ad, label key, val_fraction or split_seed): use a new run_dir")
