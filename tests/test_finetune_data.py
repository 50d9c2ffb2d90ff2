"""Finetuning data and init: a labelled h5ad -> tokens (as the embedding CLI makes them), the
training loader (deterministic per seed/epoch/rank, exact resume, labels of training cells only),
validation batches, the pre-trained init's checks and weights, and the errors users see."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_helpers import IDS, PRETRAIN_W_JEPA, build_init, labelled_counts

from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.finetune.config import FinetuneConfig, finetune_model_config, load_finetune_config
from celljepa_dist.finetune.data import (
    Masking,
    data_fingerprint,
    open_train_loader,
    read_labelled,
    validation_batches,
)
from celljepa_dist.finetune.init import load_student_weights, parent_run, pretrain_w_jepa, read_init
from celljepa_dist.finetune.split import check_label_counts, stratified_split
from celljepa_dist.model import CellJEPA
from celljepa_dist.model.pretrained import from_pretrained
from celljepa_dist.tokens import MASK_VALUE
from celljepa_dist.typed_config import ConfigError


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    return build_init(tmp_path_factory.mktemp("pre") / "run")


@pytest.fixture(scope="module")
def adata():
    return labelled_counts()


@pytest.fixture(scope="module")
def labelled(init_dir, adata):
    return read_labelled(adata, GeneVocab.load(init_dir / "vocab.json"), 51, "cell_type", where="pbmc.h5ad")


def test_tokens_are_the_cells_vocab_genes(labelled, adata, init_dir):
    vocab = GeneVocab.load(init_dir / "vocab.json")
    tokens, _ = vocab.map_genes(list(adata.var_names), list(adata.var_names))
    x = adata.X.toarray()
    for row in (0, 7, 119):
        want = np.sort(tokens[(x[row] > 0) & (tokens >= 0)])
        got = labelled.cells.genes[labelled.cells.offsets[row]:labelled.cells.offsets[row + 1]]
        assert np.array_equal(got, want)
    assert labelled.cells.bins.min() >= 1 and labelled.cells.bins.max() <= 50
    assert labelled.names == ["B", "NK", "T", "mono"]
    assert [labelled.names[c] for c in labelled.codes[:4]] == ["T", "B", "NK", "mono"]


def masking(**kw):
    return Masking(**{"batch_size": 8, "max_genes": 40, "mask_ratio": 0.4, "seed": 3, **kw})


def test_training_batches_are_deterministic_rank_disjoint_and_train_only(labelled):
    split = stratified_split(labelled.codes, 0.1, 42)
    rows, codes = split.train, labelled.codes[split.train]
    fp = data_fingerprint(labelled.cells, rows, codes)
    m = masking()
    per_rank = []
    for rank in (0, 1):
        a = list(open_train_loader(labelled.cells, rows, codes, m, 0, rank, 2, fp))
        b = list(open_train_loader(labelled.cells, rows, codes, m, 0, rank, 2, fp))
        assert len(a) == len(rows) // 16
        for x, y in zip(a, b):
            assert all(torch.equal(x[k], y[k]) for k in x)
        per_rank.append(torch.cat([x["cell_ids"] for x in a]).tolist())
    seen = per_rank[0] + per_rank[1]
    assert len(set(seen)) == len(seen) == (len(rows) // 16) * 16  # disjoint ranks, whole rounds only
    assert set(seen) <= set(split.train.tolist()) and not set(seen) & set(split.val.tolist())
    batch = next(iter(open_train_loader(labelled.cells, rows, codes, m, 0, 0, 2, fp)))
    assert torch.equal(batch["labels"], torch.from_numpy(labelled.codes[batch["cell_ids"].numpy()]))
    kept = batch["lengths"] - 1
    assert torch.equal(batch["value_mask"].sum(1), torch.ceil(kept * 0.4).long())  # mask ratio 0.4 of the kept
    assert (batch["values"][batch["value_mask"]] == MASK_VALUE).all() and int(kept.max()) <= 40
    other_epoch = next(iter(open_train_loader(labelled.cells, rows, codes, m, 1, 0, 2, fp)))
    assert not torch.equal(other_epoch["cell_ids"], batch["cell_ids"])


def test_resume_state_continues_exactly_and_refuses_other_data(labelled):
    split = stratified_split(labelled.codes, 0.1, 42)
    rows, codes = split.train, labelled.codes[split.train]
    fp = data_fingerprint(labelled.cells, rows, codes)
    m = masking()
    loader = open_train_loader(labelled.cells, rows, codes, m, 1, 1, 2, fp)
    full = list(loader)
    state = loader.state_dict(2)
    rest = list(open_train_loader(labelled.cells, rows, codes, m, 1, 1, 2, fp, resume_state=state))
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = data_fingerprint(labelled.cells, rows[1:], codes[1:])
    with pytest.raises(ValueError, match="data_fingerprint"):
        open_train_loader(labelled.cells, rows, codes, m, 1, 1, 2, other, resume_state=state)
    with pytest.raises(ValueError, match="world_size=2 does not match this run's 4"):
        open_train_loader(labelled.cells, rows, codes, m, 1, 1, 4, fp, resume_state=state)


def test_validation_batches_cover_every_cell_once_with_equal_shapes_per_rank():
    rows = np.arange(3, 26)  # 23 cells on 2 ranks: 12 + 11
    got = {r: validation_batches(rows, 5, r, 2) for r in (0, 1)}
    assert [len(b) for b, _ in got[0]] == [len(b) for b, _ in got[1]] == [5, 5, 2]
    real = np.concatenate([b[ok] for r in (0, 1) for b, ok in got[r]])
    assert sorted(real.tolist()) == rows.tolist()


def test_missing_label_column_and_single_cell_label_are_named(init_dir, adata):
    vocab = GeneVocab.load(init_dir / "vocab.json")
    with pytest.raises(ValueError, match=r"pbmc.h5ad: label key 'celltype' is not an obs column; obs columns: "
                                         r"\['cell_type', 'donor'\]"):
        read_labelled(adata, vocab, 51, "celltype", where="pbmc.h5ad")
    lonely = adata.copy()
    lonely.obs["cell_type"] = lonely.obs["cell_type"].astype(str)
    lonely.obs.iloc[5, 0] = "pDC"
    cells = read_labelled(lonely, vocab, 51, "cell_type", where="pbmc.h5ad")
    with pytest.raises(ValueError, match=r"\['pDC'\] have a single cell"):
        check_label_counts(cells.codes, cells.names, "cell_type", "pbmc.h5ad")


def test_init_checks_vocab_and_teacher(tmp_path, init_dir):
    init = read_init(init_dir, "celljepa")
    assert init.has_teacher and init.max_genes == 40 and pretrain_w_jepa(init) == PRETRAIN_W_JEPA
    other = GeneVocab.from_genes(IDS[::-1], IDS[::-1])
    other.save(tmp_path / "other_vocab.json")
    with pytest.raises(ValueError, match="a finetuned model keeps its pre-trained vocabulary"):
        read_init(init_dir, "celljepa", vocab=str(tmp_path / "other_vocab.json"))
    read_init(init_dir, "celljepa", vocab=str(init_dir.parent / "vocab.json"))  # the same vocab is fine
    no_teacher = build_init(tmp_path / "scgpt_run", teacher=False)
    with pytest.raises(ValueError, match="has no EMA teacher .*objective celljepa keeps the JEPA term"):
        read_init(no_teacher, "celljepa")
    assert not read_init(no_teacher, "scgpt").has_teacher
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_init(tmp_path / "nowhere", "scgpt")
    assert parent_run(init) is None  # a hand-made model dir: no MLflow run beside it


def test_student_weights_load_and_the_gepc_head_starts_fresh(init_dir):
    init = read_init(init_dir, "celljepa")
    cfg = FinetuneConfig(init=str(init_dir))
    cfg.data.h5ad, cfg.loss.w_mvc = "x.h5ad", 1.0
    mcfg = finetune_model_config(cfg, init.model, len(init.vocab))
    assert mcfg.use_mvc and not init.model.use_mvc
    torch.manual_seed(5)
    model = CellJEPA(mcfg)
    fresh = load_student_weights(model, init)
    assert fresh and all(k.startswith("mvc_head.") for k in fresh)
    ref = from_pretrained(init_dir)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_model_section_must_match_the_init(tmp_path, init_dir):
    sets = [f"init={init_dir}", "data.h5ad=x.h5ad"]
    cfg = load_finetune_config(None, sets + ["model.attention_backend=reference", "model.d_model=32"])
    assert cfg.model.attention_backend == "reference"
    with pytest.raises(ConfigError, match=r"model.d_model='64': the finetuned model's architecture is the init's"):
        load_finetune_config(None, sets + ["model.d_model=64"])
    with pytest.raises(ConfigError, match="init=''"):
        load_finetune_config(None, ["data.h5ad=x.h5ad"])
    with pytest.raises(ConfigError, match="data.h5ad=''"):
        load_finetune_config(None, [f"init={init_dir}"])
