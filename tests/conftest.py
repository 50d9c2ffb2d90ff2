import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real labelled cells live beside the checkout (CI has them too); never copied into the repo.
SHARED_DATA = Path(os.environ.get("CELLJEPA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


# --- data-tools fixtures (owned by the data-tools engineer) ------------------------------------
TINY_SHARDS_CELLS = 300
TINY_SHARDS_PER_SHARD = 70  # does not divide 300: shards of 70, 70, 70, 70, 20 cells


def _build_tiny_shards(root: Path) -> tuple[Path, Path]:
    import numpy as np

    from celljepa_dist.data.binning import bin_csr
    from celljepa_dist.data.shards import CellBlock, build_manifest, shard_name, write_manifest, write_shard
    from celljepa_dist.data.vocab import GeneVocab

    rng = np.random.default_rng(0)
    n_genes = 400
    vocab = GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(n_genes)], [f"GENE{i}" for i in range(n_genes)])
    vocab_path = root / "vocab.json"
    vocab.save(vocab_path)
    lens = rng.integers(5, 120, size=TINY_SHARDS_CELLS)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    genes = np.concatenate([np.sort(rng.choice(n_genes, size=k, replace=False)) + 3 for k in lens]).astype(np.int32)
    counts = (rng.negative_binomial(1, 0.4, size=int(offsets[-1])) + 1).astype(np.float32)
    n = TINY_SHARDS_CELLS
    cells = CellBlock(offsets, genes, bin_csr(offsets, counts, 51), counts, np.arange(n, dtype=np.int64) * 2,
                      {"cell_type": [f"type{i % 5}" for i in range(n)], "dataset_id": [f"ds{i % 3}" for i in range(n)],
                       "donor_id": [f"donor{i % 4}" for i in range(n)], "assay": ["10x 3' v3"] * n})
    shards_dir = root / "shards"
    entries = [write_shard(shards_dir / shard_name(i), cells.slice(s, min(s + TINY_SHARDS_PER_SHARD, n)), block_size=32)
               for i, s in enumerate(range(0, n, TINY_SHARDS_PER_SHARD))]
    write_manifest(shards_dir, build_manifest(entries, vocab.sha256, 51, {"kind": "synthetic"}, {"empty_cells": 0}))
    return shards_dir, vocab_path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(shards_dir, vocab_path): a few hundred cells in several uneven shards, built once per session."""
    return _build_tiny_shards(tmp_path_factory.mktemp("tiny_shards"))
