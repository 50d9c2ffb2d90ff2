"""GEARS' `simulation` split (gears/data_utils.py::DataSplitter), as a pure function.

Held-out *perturbations*, not cells. GEARS draws the training genes, then:
  - singles of training genes train; singles of the other genes are `unseen_single` (test);
  - combos with exactly one training gene are `combo_seen1` (test), with none `combo_seen0` (test);
  - combos with two training genes: a `combo_seen2_train_frac` share trains, the rest is `combo_seen2`;
the validation split is the same procedure on the training perturbations (0.9, 0.9), and 'ctrl'
trains. GEARS draws with numpy's global legacy RNG seeded by `seed` (reseeded before the combo
draw); `np.random.RandomState(seed)` reproduces it exactly, so the split equals GEARS' for the
same perturbations and seed (tests/test_perturb_gears_reference.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from celljepa_dist.atomic import atomic_write_text

from .gears_data import CTRL, parse_condition

SUBGROUPS = ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2")
SPLIT_FILE = "perturb_split.json"


class SplitError(ValueError):
    """The split cannot be used (e.g. a subgroup the run must evaluate is empty)."""


def genes_of(perts) -> np.ndarray:
    """GEARS' get_genes_from_perts: the sorted unique genes of the perturbations."""
    return np.unique([g for p in np.unique(list(perts)) for g in p.split("+") if g != CTRL])


def perts_of_genes(genes, perts: list[str], kind: str) -> list[str]:
    """GEARS' get_perts_from_genes: the singles or combos (in `perts` order) holding any of `genes`."""
    genes = set(map(str, genes))
    pool = [p for p in perts if len(parse_condition(p)) == (1 if kind == "single" else 2)]
    return [p for p in pool if genes.intersection(parse_condition(p))]


def simulation_split_once(perts: list[str], train_gene_set_size: float, combo_seen2_train_frac: float,
                          seed: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """One pass of GEARS' get_simulation_split: (train, test, test subgroups)."""
    unique_genes = genes_of(perts)
    rng = np.random.RandomState(seed)
    train_genes = rng.choice(unique_genes, int(len(unique_genes) * train_gene_set_size), replace=False)
    train_set = set(map(str, train_genes))
    ood_genes = np.setdiff1d(unique_genes, train_genes)

    train = perts_of_genes(train_genes, perts, "single")
    combos = perts_of_genes(train_genes, perts, "combo")
    combo_seen1 = [p for p in combos if sum(g in train_set for g in p.split("+")) == 1]
    combos_both = np.setdiff1d(combos, combo_seen1) if combos else np.array([], dtype=str)
    rng = np.random.RandomState(seed)  # GEARS reseeds before this draw
    combo_train = rng.choice(combos_both, int(len(combos_both) * combo_seen2_train_frac), replace=False) \
        if len(combos_both) else np.array([], dtype=str)
    combo_seen2 = np.setdiff1d(combos_both, combo_train).tolist()
    train.extend(str(p) for p in combo_train)
    unseen_single = perts_of_genes(ood_genes, perts, "single")
    combo_seen0 = [p for p in perts_of_genes(ood_genes, perts, "combo")
                   if sum(g in train_set for g in p.split("+")) == 0]
    test = combo_seen1 + combo_seen2 + unseen_single + combo_seen0
    assert len(train) + len(test) == len(perts), "GEARS' split must cover every perturbation once"
    groups = {"combo_seen0": combo_seen0, "combo_seen1": combo_seen1, "combo_seen2": [str(p) for p in combo_seen2],
              "unseen_single": unseen_single}
    return train, test, groups


@dataclass
class PerturbSplit:
    seed: int
    train: list[str]  # 'ctrl' included, as GEARS does
    val: list[str]
    test: list[str]
    test_subgroups: dict[str, list[str]]
    val_subgroups: dict[str, list[str]]

    def of(self, condition: str) -> str:
        if condition in self._index:
            return self._index[condition]
        raise KeyError(f"condition {condition!r} is in no split")

    def __post_init__(self):
        self._index = {c: name for name in ("train", "val", "test") for c in getattr(self, name)}

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PerturbSplit":
        return cls(**{k: d[k] for k in ("seed", "train", "val", "test", "test_subgroups", "val_subgroups")})


def simulation_split(perturbations, seed: int, train_gene_set_size: float = 0.75,
                     combo_seen2_train_frac: float = 0.75) -> PerturbSplit:
    """GEARS' DataSplitter(split_type='simulation').split_data(seed=seed) on these perturbations
    (order as GEARS sees them: obs['condition'].unique(); the sets do not depend on it)."""
    perts = [str(p) for p in perturbations if p != CTRL]
    for p in perts:
        parse_condition(p)
    if not perts:
        raise SplitError("no perturbation besides 'ctrl' to split")
    train, test, test_groups = simulation_split_once(perts, train_gene_set_size, combo_seen2_train_frac, seed)
    train, val, val_groups = simulation_split_once(train, 0.9, 0.9, seed)
    return PerturbSplit(seed=seed, train=train + [CTRL], val=val, test=test, test_subgroups=test_groups,
                        val_subgroups=val_groups)


def check_subgroups(split: PerturbSplit, required: list[str] | tuple[str, ...], has_combos: bool) -> None:
    """A run evaluates `required` test subgroups; an empty one is an error that names the seed.

    Combo subgroups are only required when the data has combos (Adamson has none)."""
    if not split.train or split.train == [CTRL]:
        raise SplitError(f"split seed {split.seed}: no training perturbation")
    if not split.val:
        raise SplitError(f"split seed {split.seed}: the validation split is empty (too few training "
                         "perturbations); choose another split seed or more perturbations")
    empty = [g for g in required if (has_combos or g == "unseen_single") and not split.test_subgroups.get(g)]
    if empty:
        sizes = {g: len(v) for g, v in split.test_subgroups.items()}
        raise SplitError(f"split seed {split.seed} leaves test subgroup(s) {empty} empty (sizes {sizes}); choose "
                         "another split seed, or drop them from perturb.subgroups")


def save_split(split: PerturbSplit, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(split.to_dict(), indent=1))


def load_split(path: str | Path) -> PerturbSplit:
    return PerturbSplit.from_dict(json.loads(Path(path).read_text()))
