"""The finetuning split: stratified, deterministic, disjoint, saved and checked on resume."""
from __future__ import annotations

import numpy as np
import pytest

from celljepa_dist.finetune.split import (
    check_label_counts,
    check_saved_split,
    n_validation,
    stratified_split,
    write_split,
)


def codes_of(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    codes = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(codes)


COUNTS = {0: 500, 1: 137, 2: 41, 3: 9, 4: 2, -1: 23}  # -1: unlabelled cells


def test_split_is_stratified_disjoint_and_covering():
    codes = codes_of(COUNTS)
    split = stratified_split(codes, 0.1, 42)
    assert np.intersect1d(split.train, split.val).size == 0
    assert np.array_equal(np.sort(np.concatenate([split.train, split.val])), np.arange(len(codes)))
    for label, n in COUNTS.items():
        n_val = int((codes[split.val] == label).sum())
        assert n_val == n_validation(n, 0.1)  # round(0.1 n), at least 1, never all
        assert 1 <= n_val < n
    assert [n_validation(n, 0.1) for n in (500, 137, 41, 9, 2)] == [50, 14, 4, 1, 1]


def test_split_is_deterministic_and_depends_on_its_seed_only():
    codes = codes_of(COUNTS)
    a, b = stratified_split(codes, 0.1, 42), stratified_split(codes.copy(), 0.1, 42)
    assert np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)
    assert not np.array_equal(a.val, stratified_split(codes, 0.1, 43).val)
    # A label's cells are chosen from its own stream: adding cells of another label changes nothing.
    more = np.concatenate([codes, np.full(30, 7)])
    c = stratified_split(more, 0.1, 42)
    assert np.array_equal(c.val[c.val < len(codes)], a.val)


def test_a_label_with_one_cell_is_refused_by_name():
    codes = np.array([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"obs\['cell_type'\] label\(s\) \['pDC'\] have a single cell"):
        check_label_counts(codes, ["B", "T", "pDC"], "cell_type", "pbmc.h5ad")
    with pytest.raises(ValueError, match="label code 2 has 1 cell"):
        stratified_split(codes, 0.1, 42)


def test_saved_split_round_trips_and_a_different_one_is_refused(tmp_path):
    codes = codes_of({0: 20, 1: 10})
    names = [f"c{i}" for i in range(len(codes))]
    labels = ["x" if c == 0 else "y" for c in codes]
    split = stratified_split(codes, 0.1, 42)
    path = write_split(tmp_path / "split.csv", split, names, labels)
    check_saved_split(path, split, names, labels)
    text = path.read_text().splitlines()
    assert text[0] == "row,obs_name,label,split" and sum(line.endswith(",val") for line in text) == len(split.val)
    with pytest.raises(ValueError, match="split.csv: the saved train/validation split differs"):
        check_saved_split(path, stratified_split(codes, 0.1, 7), names, labels)
