"""A simulated Perturb-seq screen written as a GEARS directory, with effects known by construction.

Norman and Adamson cannot be downloaded here; the tests and the demo need data whose answers
are known. Genes are those of a model the tests can make: a vocab.json's genes, or the embedded
Census simulator's (data/simulate.py: same feature ids and names), so a model pre-trained on
either can be the perturbation run's `init`.

Cells: counts ~ Gamma-Poisson(shape 5) with mean  library * softmax(base + e_p), library
lognormal. For a single perturbation of gene g, the log-fold vector e_g is
  - the target itself: `target_lfc` (negative: CRISPRi knock-down; positive: CRISPRa);
  - a response shared by every perturbation (genes up and down), scaled per g: what the
    mean-shift baseline captures;
  - the program of g's module (genes up and down beyond the target), shared by the module's genes;
  - a few genes specific to g.
A combo A+B is `additive` (e_A + e_B), `synergy` (plus an interaction on genes of neither) or
`buffering` (0.5 (e_A + e_B)): `simulation.json` records each combo's kind, which the tests use.
Everything is a pure function of the seed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from celljepa_dist.atomic import atomic_write_text

from .gears_data import CTRL
from .prepare import counts_to_gears, write_gears_dir

TRUTH_FILE = "simulation.json"
COMBO_KINDS = ("additive", "synergy", "buffering")


@dataclass
class PerturbSimConfig:
    genes: int = 500  # genes measured (the first N of the vocab / simulator)
    perturbed_genes: int = 24
    combos: int = 60
    cells_per_perturbation: int = 40
    control_cells: int = 400
    modules: int = 6
    target_lfc: float = -2.5  # the perturbed gene's own log-fold change
    shared_genes: int = 30  # the response every perturbation shares
    module_genes: int = 25  # each module's program
    specific_genes: int = 8
    non_additive_fraction: float = 0.4  # of the combos: synergy or buffering, half each
    library_mean: float = 4000.0
    seed: int = 0

    def validate(self) -> "PerturbSimConfig":
        if self.genes < 50:
            raise ValueError(f"genes={self.genes}: must be >= 50")
        if not 2 <= self.perturbed_genes <= self.genes // 4:
            raise ValueError(f"perturbed_genes={self.perturbed_genes}: must be in 2..genes/4")
        max_combos = self.perturbed_genes * (self.perturbed_genes - 1) // 2
        if not 0 <= self.combos <= max_combos:
            raise ValueError(f"combos={self.combos}: must be in 0..{max_combos} (pairs of perturbed genes)")
        if self.cells_per_perturbation < 2 or self.control_cells < 2:
            raise ValueError("cells_per_perturbation and control_cells must be >= 2")
        if not 0 <= self.non_additive_fraction <= 1:
            raise ValueError(f"non_additive_fraction={self.non_additive_fraction}: must be in [0, 1]")
        return self


def genes_from_vocab(vocab_path: str | Path, n: int) -> tuple[list[str], list[str]]:
    from celljepa_dist.data.vocab import GeneVocab

    vocab = GeneVocab.load(vocab_path)
    if len(vocab.feature_ids) < n:
        raise ValueError(f"{vocab_path}: {len(vocab.feature_ids)} genes, fewer than genes={n}")
    names = vocab.feature_names[:n]
    if len(set(names)) != n or not all(names):
        raise ValueError(f"{vocab_path}: the first {n} feature_names are not unique and non-empty (conditions name "
                         "genes by symbol)")
    return vocab.feature_ids[:n], names


def genes_from_census_simulator(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """The first n genes of the embedded Census simulator (data/simulate.py), ids and names as there."""
    from celljepa_dist.data.simulate import CensusWorld, SimulationConfig

    world = CensusWorld(SimulationConfig(cells=1, genes=max(n, 500), seed=seed))
    return world.feature_ids[:n], world.feature_names[:n]


def _signed(rng, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, n) * rng.choice([-1.0, 1.0], n)


class PerturbWorld:
    """The fixed part: baseline, modules, per-gene effects, combos (a function of the config)."""

    def __init__(self, cfg: PerturbSimConfig, gene_names: list[str]):
        self.cfg = cfg.validate()
        rng = np.random.default_rng([cfg.seed, 11])
        G = cfg.genes
        self.base = rng.normal(0.0, 1.5, G)
        by_expr = np.argsort(-self.base)
        # Perturbed genes among the well-expressed half, so a knock-down is visible.
        self.targets = np.sort(rng.choice(by_expr[: G // 2], cfg.perturbed_genes, replace=False))
        self.target_names = [gene_names[i] for i in self.targets]
        others = np.setdiff1d(by_expr[: int(G * 0.8)], self.targets)
        shared_idx = rng.choice(others, cfg.shared_genes, replace=False)
        self.shared = np.zeros(G)
        self.shared[shared_idx] = _signed(rng, cfg.shared_genes, 0.4, 1.0)
        self.module_of = rng.integers(0, cfg.modules, cfg.perturbed_genes)
        self.programs = np.zeros((cfg.modules, G))
        for m in range(cfg.modules):
            idx = rng.choice(others, cfg.module_genes, replace=False)
            self.programs[m, idx] = _signed(rng, cfg.module_genes, 0.8, 2.0)
        self.effects = np.zeros((cfg.perturbed_genes, G))
        for k, t in enumerate(self.targets):
            e = rng.uniform(0.6, 1.4) * self.shared + rng.uniform(0.7, 1.3) * self.programs[self.module_of[k]]
            idx = rng.choice(others, cfg.specific_genes, replace=False)
            e[idx] += _signed(rng, cfg.specific_genes, 0.6, 1.5)
            e[t] = cfg.target_lfc
            self.effects[k] = e
        pairs = [(a, b) for a in range(cfg.perturbed_genes) for b in range(a + 1, cfg.perturbed_genes)]
        chosen = rng.choice(len(pairs), cfg.combos, replace=False) if cfg.combos else []
        self.combos = [pairs[i] for i in sorted(chosen)]
        u = rng.random(len(self.combos))
        half = cfg.non_additive_fraction / 2
        self.combo_kinds = ["synergy" if x < half else "buffering" if x < 2 * half else "additive" for x in u]
        self.interactions = np.zeros((len(self.combos), G))
        for c, kind in enumerate(self.combo_kinds):
            if kind == "synergy":
                idx = rng.choice(others, cfg.module_genes, replace=False)
                self.interactions[c, idx] = _signed(rng, cfg.module_genes, 1.0, 2.0)

    def conditions(self) -> list[str]:
        singles = [f"{n}+{CTRL}" for n in self.target_names]
        combos = [f"{self.target_names[a]}+{self.target_names[b]}" for a, b in self.combos]
        return singles + combos

    def log_fold(self, condition: str) -> np.ndarray:
        if condition == CTRL:
            return np.zeros(self.cfg.genes)
        k = {n: i for i, n in enumerate(self.target_names)}
        a, b = condition.split("+")
        if b == CTRL:
            return self.effects[k[a]]
        c = self.combos.index((k[a], k[b]))
        total = self.effects[k[a]] + self.effects[k[b]]
        kind = self.combo_kinds[c]
        if kind == "buffering":
            total = 0.5 * total
        total = total + self.interactions[c]
        # Both targets keep their own knock-down whatever the interaction.
        total[self.targets[[k[a], k[b]]]] = self.cfg.target_lfc
        return total


def simulate_counts(world: PerturbWorld) -> tuple[sp.csr_matrix, list[str]]:
    """(counts [cells, genes] CSR float32, condition per cell): control cells first."""
    cfg = world.cfg
    rng = np.random.default_rng([cfg.seed, 12])
    conds = [CTRL] * cfg.control_cells + [c for c in world.conditions() for _ in range(cfg.cells_per_perturbation)]
    blocks = []
    for cond in dict.fromkeys(conds):
        n = conds.count(cond)
        logits = world.base + world.log_fold(cond)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        library = cfg.library_mean * np.exp(rng.normal(0.0, 0.3, n))
        mu = library[:, None] * p[None, :]
        lam = rng.gamma(5.0, mu / 5.0)  # Gamma-Poisson: overdispersed like UMI counts
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    return sp.vstack(blocks).tocsr(), conds


def write_simulated_gears(out_dir: str | Path, cfg: PerturbSimConfig, feature_ids: list[str],
                          feature_names: list[str]) -> Path:
    """Simulate, process as GEARS does (prepare.counts_to_gears), write `out_dir` with
    perturb_processed.h5ad and simulation.json (the truth). Returns out_dir."""
    import anndata as ad
    import pandas as pd

    cfg.validate()
    if len(feature_ids) != cfg.genes or len(feature_names) != cfg.genes:
        raise ValueError(f"need {cfg.genes} genes, got {len(feature_ids)} ids and {len(feature_names)} names")
    world = PerturbWorld(cfg, list(feature_names))
    counts, conds = simulate_counts(world)
    raw = ad.AnnData(X=counts, obs=pd.DataFrame({"perturbation": conds}, index=[f"cell{i}" for i in range(len(conds))]),
                     var=pd.DataFrame({"gene_name": list(feature_names)}, index=list(feature_ids)))
    gears = counts_to_gears(raw, "perturbation", [CTRL], cell_type="K562-sim", gene_name_key="gene_name",
                            where="simulated counts")
    out_dir = Path(out_dir)
    write_gears_dir(gears, out_dir)
    truth = {"config": asdict(cfg), "perturbed_genes": world.target_names,
             "combos": {f"{world.target_names[a]}+{world.target_names[b]}": kind
                        for (a, b), kind in zip(world.combos, world.combo_kinds)},
             "modules": {n: int(m) for n, m in zip(world.target_names, world.module_of)}}
    atomic_write_text(out_dir / TRUTH_FILE, json.dumps(truth, indent=1))
    return out_dir
