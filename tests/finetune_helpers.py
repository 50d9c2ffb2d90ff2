"""What the finetuning tests share: a tiny pre-trained model directory (a real CellJEPA through
save_pretrained, with or without an EMA teacher, beside a pre-training run's config.yaml) and a
labelled count matrix over its genes."""
from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import yaml

from celljepa_dist.data.binning import BINNING_RULE
from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.model import CellJEPA, ModelConfig, make_teacher, save_pretrained

N_VOCAB = 200
IDS = [f"ENSG{i:011d}" for i in range(N_VOCAB)]
SYMBOLS = [f"GENE{i}" for i in range(N_VOCAB)]
PRETRAIN_W_JEPA = 250.0  # not the default 1000: inheritance is visible


def build_init(run_dir: Path, teacher: bool = True, ids=IDS, seed: int = 0, max_genes: int = 40,
               use_mvc: bool = False) -> Path:
    """RUN_DIR/model of a (pretend) pre-training run; RUN_DIR/config.yaml holds its loss weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab = GeneVocab.from_genes(ids, [f"SYM{g}" for g in ids])
    vocab.save(run_dir / "vocab.json")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=2, n_heads=4, d_hid=32, dropout=0.1,
                      attention_backend="sdpa", use_mvc=use_mvc)
    model = CellJEPA(cfg)
    ema = make_teacher(model.student) if teacher else None
    if ema is not None:
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(0.02 * torch.randn_like(p))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"objective": "celljepa" if teacher else "scgpt",
                                                         "loss": {"w_rec": 1.0, "w_jepa": PRETRAIN_W_JEPA}}))
    data = {"n_bins": 51, "max_genes": max_genes, "binning_rule": BINNING_RULE}
    return save_pretrained(model, run_dir / "model", vocab_path=run_dir / "vocab.json", teacher=ema, data=data,
                           source={"objective": "celljepa" if teacher else "scgpt"})


def labelled_counts(n_cells: int = 120, seed: int = 0, types=("T", "B", "NK", "mono"), n_extra: int = 20) -> anndata.AnnData:
    """Counts over 150 vocab genes + genes outside it; each type expresses its own block of genes
    more, so types are learnable."""
    rng = np.random.default_rng(seed)
    genes = list(rng.permutation(IDS[:150])) + [f"ENSG9{i:010d}" for i in range(n_extra)]
    labels = np.array([types[i % len(types)] for i in range(n_cells)])
    x = rng.poisson(0.6, size=(n_cells, len(genes))).astype(np.float32)
    for t, name in enumerate(types):
        x[labels == name, t * 30:(t + 1) * 30] += rng.poisson(3.0, size=((labels == name).sum(), 30))
    x[:, 0] += 1
    obs = pd.DataFrame({"cell_type": labels, "donor": rng.choice(["d1", "d2"], n_cells)},
                       index=[f"cell{i}" for i in range(n_cells)])
    return anndata.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
