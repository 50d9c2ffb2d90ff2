"""Encoder = scGPT's: embeddings, blocks equal to nn.TransformerEncoderLayer, configs."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from celljepa_dist.model import CellEncoder, CellJEPA, ModelConfig
from celljepa_dist.model.embedding import CategoryValueEmbedding, ContinuousValueEmbedding
from celljepa_dist.model.synthetic import random_batch

REPO = Path(__file__).resolve().parents[1]


def cfg(**kw):
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_hid=48, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def torch_layer_from_block(block, c: ModelConfig, norm_first: bool) -> nn.TransformerEncoderLayer:
    layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_hid, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, layer_norm_eps=c.layer_norm_eps)
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)
        layer.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
        layer.self_attn.out_proj.weight.copy_(block.attn.out.weight)
        layer.self_attn.out_proj.bias.copy_(block.attn.out.bias)
        layer.linear1.load_state_dict(block.mlp[0].state_dict())
        layer.linear2.load_state_dict(block.mlp[3].state_dict())
        layer.norm1.load_state_dict(block.norm1.state_dict())
        layer.norm2.load_state_dict(block.norm2.state_dict())
    return layer.eval()


@pytest.mark.parametrize("norm_style", ["post", "pre"])
def test_encoder_equals_pytorch_transformer_layers(norm_style):
    """scGPT builds its encoder from nn.TransformerEncoderLayer (post-norm, ReLU)."""
    torch.manual_seed(0)
    c = cfg(norm_style=norm_style)
    enc = CellEncoder(c).eval()
    b = random_batch([11, 6, 3], vocab_size=50, seed=0)
    pad = b["padding_mask"]
    x = enc.embed(b["gene_ids"], b["target_values"])
    for block in enc.blocks:
        x = torch_layer_from_block(block, c, norm_style == "pre")(x, src_key_padding_mask=pad)
    if norm_style == "pre":
        x = enc.final_norm(x)
    want = x.masked_fill(pad.unsqueeze(-1), 0.0)
    got = enc(b["gene_ids"], b["target_values"], pad, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_continuous_value_embedding_follows_scgpt():
    torch.manual_seed(0)
    emb = ContinuousValueEmbedding(cfg(max_value=10.0)).eval()
    v = torch.tensor([[-2.0, -1.0, 0.0, 3.0, 10.0, 700.0]])
    x = v.unsqueeze(-1).clamp(max=10.0)
    want = emb.norm(emb.linear2(torch.relu(emb.linear1(x))))
    torch.testing.assert_close(emb(v), want)
    torch.testing.assert_close(emb(v)[0, 5], emb(v)[0, 4])  # clamped like scGPT
    assert not torch.allclose(emb(v)[0, 0], emb(v)[0, 1])  # pad and mask embed differently


def test_category_value_embedding_maps_sentinels_to_their_ids():
    emb = CategoryValueEmbedding(cfg(n_bins=5, value_encoder="category"))
    ids = emb.category_ids(torch.tensor([-2.0, -1.0, 0.0, 1.0, 4.0, 9.0]))
    assert ids.tolist() == [6, 5, 0, 1, 4, 4]
    assert torch.equal(emb.embedding.weight[6], torch.zeros(32))  # pad id is padding_idx


def test_cls_token_comes_from_the_gene_table():
    torch.manual_seed(0)
    enc = CellEncoder(cfg())
    ids = torch.tensor([[1, 5]])
    z = enc.embed(ids, torch.tensor([[0.0, 3.0]]))
    want = enc.embed.gene.norm(enc.embed.gene.embedding.weight[1]) + enc.embed.value(torch.tensor([0.0]))[0]
    torch.testing.assert_close(z[0, 0], want)


def test_category_encoder_runs_end_to_end():
    model = CellJEPA(cfg(value_encoder="category"))
    b = random_batch([9, 4], vocab_size=50, seed=1)
    out = model(b)
    assert out.cell_emb.shape == (2, 32) and torch.isfinite(out.pred_values).all()


def test_dropout_makes_training_stochastic_and_eval_deterministic():
    torch.manual_seed(0)
    enc = CellEncoder(cfg(dropout=0.2))
    b = random_batch([9, 4], vocab_size=50, seed=1)
    args = (b["gene_ids"], b["values"], b["padding_mask"], b["value_mask"])
    assert not torch.allclose(enc(*args), enc(*args))
    enc.eval()
    torch.testing.assert_close(enc(*args), enc(*args))


def test_config_validation_names_the_bad_field():
    for kw, field in [
        (dict(n_heads=5), "n_heads"), (dict(attention_backend="xformers"), "attention_backend"),
        (dict(norm_style="sandwich"), "norm_style"), (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=2), "vocab_size"), (dict(value_encoder="log"), "value_encoder"),
        (dict(attention_backend="flash", d_model=36, n_heads=3), "n_heads"),
    ]:
        with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
            cfg(**kw).validate()
    with pytest.raises(ValueError, match="vocab_size is unset"):
        CellEncoder(ModelConfig())


def test_yaml_configs_load_and_reject_unknown_keys(tmp_path):
    paper = ModelConfig.from_yaml(REPO / "configs/model/paper.yaml")
    assert (paper.n_layers, paper.d_model, paper.n_heads, paper.d_hid, paper.dropout) == (12, 512, 8, 512, 0.2)
    ModelConfig.from_yaml(REPO / "configs/model/tiny.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 64\nn_layer: 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*n_layer"):
        ModelConfig.from_yaml(bad)


def test_batch_with_missing_key_is_rejected():
    model = CellJEPA(cfg())
    b = random_batch([5], vocab_size=50)
    del b["value_mask"]
    with pytest.raises(KeyError, match="value_mask"):
        model(b)
    with pytest.raises(ValueError, match="same"):
        model.student(b["gene_ids"], b["values"][:, :2], b["padding_mask"])
