"""What the perturbation tests share: a hand-made GearsData, a small simulated GEARS directory on the
Census simulator's genes, and a tiny pre-trained model whose vocab holds those genes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from celljepa_dist.perturb.gears_data import GearsData, condition_name
from celljepa_dist.perturb.simulate import PerturbSimConfig

# ~1 s of simulation + scanpy's DE test; 16 perturbed genes, 30 combos, 200 genes.
SMALL_SIM = PerturbSimConfig(genes=200, perturbed_genes=16, combos=30, cells_per_perturbation=20, control_cells=200,
                             modules=4, shared_genes=20, module_genes=15, specific_genes=5, seed=0)


def hand_data(means: dict[str, list[float]], cells_per_condition: int = 2, de: dict | None = None,
              gene_names: list[str] | None = None) -> GearsData:
    """GearsData whose cells of each condition all equal the given mean vector (so every mean is exact)."""
    G = len(next(iter(means.values())))
    names = gene_names or [f"G{i}" for i in range(G)]
    conds = [c for c in means for _ in range(cells_per_condition)]
    X = sp.csr_matrix(np.array([means[c] for c in conds], dtype=np.float32))
    cn = {c: condition_name("cell", c) for c in means}
    de = de or {}
    ranked = {cn[c]: np.array([f"id{k}" for k in de.get(c, range(G))], dtype=object) for c in means if c != "ctrl"}
    return GearsData(path=Path("hand.h5ad"), X=X, conditions=np.array(conds, dtype=object),
                     cell_types=np.array(["cell"] * len(conds), dtype=object),
                     gene_ids=np.array([f"id{k}" for k in range(G)], dtype=object),
                     gene_names=np.array(names, dtype=object), condition_names=cn, de_genes=ranked,
                     non_dropout_de={k: v[:20] for k, v in ranked.items()})


def write_sim(root: Path, cfg: PerturbSimConfig = SMALL_SIM) -> Path:
    from celljepa_dist.perturb.simulate import genes_from_census_simulator, write_simulated_gears

    ids, names = genes_from_census_simulator(cfg.genes)
    return write_simulated_gears(root / "gears", cfg, ids, names)


def write_tiny_init(root: Path, genes: int = SMALL_SIM.genes, **model) -> Path:
    """A save_pretrained dir of a fresh tiny CellJEPA whose vocab is the simulator's first genes."""
    import torch

    from celljepa_dist.data.vocab import GeneVocab
    from celljepa_dist.model import CellJEPA
    from celljepa_dist.model.config import ModelConfig
    from celljepa_dist.model.pretrained import save_pretrained
    from celljepa_dist.perturb.simulate import genes_from_census_simulator

    ids, names = genes_from_census_simulator(genes)
    vocab = GeneVocab.from_genes(ids, names)
    root.mkdir(parents=True, exist_ok=True)
    vocab.save(root / "vocab.json")
    cfg = ModelConfig(vocab_size=len(vocab), **{"d_model": 32, "n_layers": 2, "n_heads": 2, "d_hid": 32,
                                                 "dropout": 0.0, "attention_backend": "reference", **model})
    torch.manual_seed(0)
    return save_pretrained(CellJEPA(cfg), root / "init", vocab_path=root / "vocab.json",
                           data={"n_bins": cfg.n_bins, "max_genes": 64, "binning_rule": "test"})
