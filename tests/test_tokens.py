"""One token and value contract (celljepa_dist/tokens.py): every consumer agrees with it, no other
module restates it, and older config files that restate it still load (or fail naming the key)."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from celljepa_dist import tokens as T
from celljepa_dist.data.binning import bin_csr
from celljepa_dist.data.collate import collate_cells, to_tensors
from celljepa_dist.data.shards import (
    CellBlock,
    build_manifest,
    shard_name,
    validate_shards,
    write_manifest,
    write_shard,
)
from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.model.config import ModelConfig
from celljepa_dist.model.embedding import CategoryValueEmbedding, GeneEmbedding
from celljepa_dist.model.synthetic import random_batch
from celljepa_dist.zero_shot.cells import TokenizedCells, batch_arrays

REPO = Path(__file__).resolve().parents[1]
N_BINS = 51


def test_the_contract_is_the_documented_one():
    # docs/ARCHITECTURE.md, written out independently of the module.
    assert T.SPECIAL_TOKENS == ("<pad>", "<cls>", "<eoc>")
    assert (T.PAD_ID, T.CLS_ID, T.EOC_ID, T.N_SPECIAL) == (0, 1, 2, 3)
    assert (T.MASK_VALUE, T.PAD_VALUE, T.CLS_VALUE) == (-1.0, -2.0, 0.0)
    # Sentinels are not bins (bins are 1..n_bins-1, <cls> 0) and differ from each other.
    assert T.MASK_VALUE < 0 and T.PAD_VALUE < 0 and T.MASK_VALUE != T.PAD_VALUE
    assert len({T.PAD_ID, T.CLS_ID, T.EOC_ID}) == T.N_SPECIAL


def check_batch(batch: dict, where: str) -> None:
    """A batch (numpy or torch) follows the contract in every position."""
    b = {k: np.asarray(v) for k, v in batch.items()}
    pad, mask = b["padding_mask"], b["value_mask"]
    genes = ~pad
    genes[:, 0] = False
    assert pad.any() and mask.any(), f"{where}: the batch must exercise padding and masking"
    assert (b["gene_ids"][:, 0] == T.CLS_ID).all(), where
    assert (b["gene_ids"][pad] == T.PAD_ID).all(), where
    assert (b["gene_ids"][genes] >= T.N_SPECIAL).all(), where
    assert (b["values"][:, 0] == T.CLS_VALUE).all() and (b["target_values"][:, 0] == T.CLS_VALUE).all(), where
    assert (b["values"][pad] == T.PAD_VALUE).all() and (b["target_values"][pad] == T.PAD_VALUE).all(), where
    assert (b["values"][mask] == T.MASK_VALUE).all(), where
    known = genes & ~mask
    assert (b["values"][known] == b["target_values"][known]).all() and (b["target_values"][genes] >= 1).all(), where
    assert not mask[:, 0].any() and not (mask & pad).any(), where


def small_cells(n_cells=6, vocab_size=40, seed=0):
    rng = np.random.default_rng(seed)
    lens = np.array([1, 5, 12, 3, 9, 7][:n_cells])
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    genes = np.concatenate([np.sort(rng.choice(np.arange(T.N_SPECIAL, vocab_size), k, replace=False)) for k in lens])
    counts = rng.integers(1, 20, size=int(offsets[-1])).astype(np.float32)
    return offsets, genes.astype(np.int32), bin_csr(offsets, counts, N_BINS), counts


def test_collated_synthetic_and_zero_shot_batches_follow_the_contract():
    offsets, genes, bins, _ = small_cells()
    for known_first in (False, True):
        batch = collate_cells(offsets, genes, bins, np.arange(6), seed=1, epoch=0, max_genes=600, mask_ratio=0.5,
                              known_first=known_first)
        check_batch(batch, f"collate_cells(known_first={known_first})")
        check_batch(to_tensors(batch), "to_tensors")
    check_batch(random_batch([1, 5, 12, 3], vocab_size=40, mask_ratio=0.5, seed=3), "random_batch")
    zero_shot = batch_arrays(TokenizedCells(offsets, genes, bins, bins.astype(np.float32)))
    assert not zero_shot["value_mask"].any()
    zero_shot["value_mask"][1, 1] = True  # nothing masked there; pretend one to reuse the check
    zero_shot["values"][1, 1] = T.MASK_VALUE
    check_batch(zero_shot, "zero_shot batch_arrays")


def test_vocab_ids_are_the_contract(tmp_path):
    vocab = GeneVocab.from_genes(["ENSG1", "ENSG2"], ["A", "B"])
    vocab.save(tmp_path / "v.json")
    loaded = GeneVocab.load(tmp_path / "v.json")
    for v in (vocab, loaded):
        assert v.special_tokens == T.SPECIAL_TOKENS
        assert (v.pad_id, v.cls_id, v.eoc_id) == (T.PAD_ID, T.CLS_ID, T.EOC_ID)
        assert [v.special_tokens.index(t) for t in T.SPECIAL_TOKENS] == [T.PAD_ID, T.CLS_ID, T.EOC_ID]
        assert v.map_genes(["ENSG1", "ENSG2"])[0].tolist() == [T.N_SPECIAL, T.N_SPECIAL + 1]
        assert len(v) == T.N_SPECIAL + 2
    with pytest.raises(ValueError, match="special_tokens must start with"):
        GeneVocab(["ENSG1"], ["A"], ("<cls>", "<pad>", "<eoc>"))


def test_validate_shards_rejects_special_token_ids_by_default(tmp_path):
    def shard_set(path, first_gene):
        offsets = np.array([0, 2], np.int64)
        genes = np.array([first_gene, T.N_SPECIAL + 5], np.int32)
        counts = np.array([1.0, 2.0], np.float32)
        block = CellBlock(offsets, genes, bin_csr(offsets, counts, N_BINS), counts, np.array([7], np.int64),
                          {"cell_type": ["t"], "dataset_id": ["d"], "donor_id": ["x"], "assay": ["a"]})
        path.mkdir()
        write_manifest(path, build_manifest([write_shard(path / shard_name(0), block)], "ab" * 32, N_BINS, {}, {}))
        return path

    assert validate_shards(shard_set(tmp_path / "ok", T.N_SPECIAL)) == []
    faults = validate_shards(shard_set(tmp_path / "bad", T.N_SPECIAL - 1))
    assert len(faults) == 1 and f"gene id {T.N_SPECIAL - 1} is a special token" in faults[0], faults


def test_model_embeddings_read_the_contract():
    cfg = ModelConfig(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_hid=8, value_encoder="category")
    gene = GeneEmbedding(cfg)
    assert gene.embedding.padding_idx == T.PAD_ID
    assert torch.count_nonzero(gene.embedding.weight[T.PAD_ID]) == 0
    values = CategoryValueEmbedding(cfg)
    ids = values.category_ids(torch.tensor([T.CLS_VALUE, 1.0, 50.0, T.MASK_VALUE, T.PAD_VALUE]))
    assert ids.tolist() == [0, 1, 50, cfg.n_bins, cfg.n_bins + 1]
    assert values.embedding.padding_idx == cfg.n_bins + 1
    assert not {"pad_id", "cls_id", "mask_value", "pad_value"} & set(cfg.to_dict())


CONTRACT_NAMES = {"SPECIAL_TOKENS", "PAD_ID", "CLS_ID", "EOC_ID", "N_SPECIAL", "MASK_VALUE", "PAD_VALUE", "CLS_VALUE"}
CONTRACT_PARAMS = {"pad_id", "cls_id", "eoc_id", "n_special", "mask_value", "pad_value", "cls_value"}


def test_no_other_module_restates_the_contract():
    """No module but tokens.py assigns a contract name, and no function takes an id or sentinel
    as a parameter with a literal default (a second source of truth)."""
    offenders = []
    for path in sorted((REPO / "celljepa_dist").rglob("*.py")):
        if path.name == "tokens.py" and path.parent.name == "celljepa_dist":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                names |= {e.id for t in targets if isinstance(t, ast.Tuple) for e in t.elts if isinstance(e, ast.Name)}
                names |= {t.attr for t in targets if isinstance(t, ast.Attribute)}
                offenders += [f"{path.name}:{node.lineno} assigns {n}" for n in names
                              if n in CONTRACT_NAMES or n in CONTRACT_PARAMS]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args
                pairs = list(zip(args[len(args) - len(node.args.defaults):], node.args.defaults))
                pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
                offenders += [f"{path.name}:{node.lineno} {node.name}({a.arg}={ast.unparse(d)})" for a, d in pairs
                              if a.arg in CONTRACT_PARAMS and isinstance(d, (ast.Constant, ast.UnaryOp))]
    assert offenders == []


# --- files written before the contract module: they restate it in the model config --------------

LEGACY = {"pad_id": 0, "cls_id": 1, "mask_value": -1.0, "pad_value": -2.0}


def test_accept_legacy_token_keys_is_pure_and_names_the_key():
    data = {"d_model": 8, **LEGACY}
    before = dict(data)
    assert T.accept_legacy_token_keys(data, "f.json") == {"d_model": 8}
    assert data == before
    assert T.accept_legacy_token_keys({"d_model": 8, "mask_value": -1}, "f.yaml") == {"d_model": 8}  # YAML int
    for key, bad in [("pad_id", 5), ("cls_id", 0), ("mask_value", -3.0), ("pad_value", -1.0), ("cls_id", True),
                     ("pad_id", "0")]:
        with pytest.raises(ValueError, match=rf"f\.json: {key}=.* differs from the token contract"):
            T.accept_legacy_token_keys({**data, key: bad}, "f.json")


def saved_model_dir(tmp_path, legacy: dict):
    from celljepa_dist.model import CellJEPA, save_pretrained

    cfg = ModelConfig(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_hid=8, dropout=0.0)
    directory = save_pretrained(CellJEPA(cfg), tmp_path / "m")
    meta = json.loads((directory / "config.json").read_text())
    meta["model"].update(legacy)  # as written before the fields were removed
    (directory / "config.json").write_text(json.dumps(meta))
    return directory, cfg


def test_old_config_json_loads_and_a_different_value_names_file_and_key(tmp_path):
    from celljepa_dist.model.pretrained import from_pretrained, load_config

    directory, cfg = saved_model_dir(tmp_path, LEGACY)
    assert load_config(directory) == cfg
    from_pretrained(directory)
    (directory / "config.json").write_text(
        (directory / "config.json").read_text().replace('"pad_value": -2.0', '"pad_value": -5.0'))
    with pytest.raises(ValueError, match=r"config\.json: pad_value=-5\.0 differs from the token contract"):
        load_config(directory)


def test_old_train_state_model_loads(tmp_path):
    from celljepa_dist.export import model_config_of

    cfg = ModelConfig(vocab_size=20, d_model=8, n_layers=1, n_heads=2, d_hid=8)
    assert model_config_of(tmp_path, {"model": {**cfg.to_dict(), **LEGACY}}) == cfg
    with pytest.raises(ValueError, match=r"train_state\.json: model: cls_id=2 differs"):
        model_config_of(tmp_path, {"model": {**cfg.to_dict(), **LEGACY, "cls_id": 2}})


def test_old_run_config_yaml_loads(tmp_path):
    from celljepa_dist.config import ConfigError, load_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"shards_dir": "s"}, "model": {"d_model": 64, **LEGACY}}))
    assert load_config(path).model == load_config(None, ["data.shards_dir=s", "model.d_model=64"]).model
    path.write_text(yaml.safe_dump({"data": {"shards_dir": "s"}, "model": {"mask_value": -3.0}}))
    with pytest.raises(ConfigError, match=r"config\.yaml: model: mask_value=-3\.0 differs from the token contract"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.pad_id"):  # no longer settable
        load_config(None, ["data.shards_dir=s", "model.pad_id=0"])
