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
# Built through the real pipeline: simulated Census-shaped SOMA store -> vocab -> kidney filter ->
# shards. Seed 3 gives 311 primary kidney cells (8 cell types, 3 datasets, 12 donors); shards of
# 70 cells do not divide that: 70, 70, 70, 70, 31.
TINY_SHARDS_PER_SHARD = 70


def _build_tiny_shards(root: Path) -> tuple[Path, Path]:
    from celljepa_dist.data.build import ShardBuildConfig, build_shards
    from celljepa_dist.data.census import CensusSource, CensusSourceConfig
    from celljepa_dist.data.simulate import SimulationConfig, write_store
    from celljepa_dist.data.vocab import GeneVocab

    store = write_store(root / "census", SimulationConfig(cells=700, genes=2000, seed=3), progress=False)
    with CensusSource(CensusSourceConfig(uri=str(store))) as source:
        vocab = GeneVocab.from_genes(source.feature_ids, source.feature_names)
        vocab_path = root / "vocab.json"
        vocab.save(vocab_path)
        shards_dir = root / "shards"
        build_shards(source, vocab, ShardBuildConfig(out=str(shards_dir), cells_per_shard=TINY_SHARDS_PER_SHARD,
                                                      block_size=32), progress=False)
    return shards_dir, vocab_path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(shards_dir, vocab_path): a few hundred cells in several uneven shards, built once per session."""
    return _build_tiny_shards(tmp_path_factory.mktemp("tiny_shards"))
