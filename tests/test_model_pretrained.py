"""save_pretrained / from_pretrained: round trip, backend independence, clear errors."""
import json

import pytest
import torch

from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.model import CellJEPA, ModelConfig, make_teacher
from celljepa_dist.model.pretrained import from_pretrained, load_encoder, load_meta, save_pretrained
from celljepa_dist.model.synthetic import random_batch


def write_vocab(path, n_genes):
    GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(n_genes)], [f"G{i}" for i in range(n_genes)]).save(path)
    return path


def model_and_batch(backend="flash"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=43, d_model=32, n_layers=2, n_heads=4, d_hid=32, dropout=0.1,
                      attention_backend=backend, flash_kernel="torch", use_mvc=True)
    return CellJEPA(cfg), random_batch([9, 5, 7], vocab_size=43, seed=1)


def test_round_trip_across_backends(tmp_path):
    model, batch = model_and_batch("flash")
    teacher = make_teacher(model.student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01)  # a teacher that differs from the student
    save_pretrained(model, tmp_path / "m", vocab_path=write_vocab(tmp_path / "v.json", 40), teacher=teacher)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "model.safetensors", "teacher.safetensors", "vocab.json"]
    # One meaning of the vocab hash: the GeneVocab content hash that shard manifests record.
    assert load_meta(tmp_path / "m")["vocab_sha256"] == GeneVocab.load(tmp_path / "v.json").sha256
    model.eval()
    want = model(batch)
    for backend in ("sdpa", "reference", "flash"):
        loaded = from_pretrained(tmp_path / "m", attention_backend=backend).eval()
        assert loaded.student.backend == backend
        got = loaded(batch)
        torch.testing.assert_close(got.pred_values, want.pred_values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.mvc_pred, want.mvc_pred, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.jepa_pred, want.jepa_pred, atol=1e-5, rtol=1e-5)
    enc = load_encoder(tmp_path / "m", "teacher", attention_backend="sdpa")
    for (name, a), (_, b) in zip(enc.named_parameters(), teacher.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert not enc.training


def test_bf16_model_is_saved_as_fp32(tmp_path):
    model, _ = model_and_batch("sdpa")
    save_pretrained(model.to(torch.bfloat16), tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_data_section_is_checked_and_kept(tmp_path):
    model, _ = model_and_batch("sdpa")
    data = {"n_bins": 51, "max_genes": 128, "binning_rule": "r"}
    save_pretrained(model, tmp_path / "m", data=data, source={"checkpoint": "c", "step": 3})
    meta = load_meta(tmp_path / "m")
    assert meta["data"] == data and meta["source"] == {"checkpoint": "c", "step": 3}
    with pytest.raises(ValueError, match="n_bins=11"):
        save_pretrained(model, tmp_path / "m2", data={**data, "n_bins": 11})
    with pytest.raises(ValueError, match="max_genes"):
        save_pretrained(model, tmp_path / "m3", data={"n_bins": 51, "binning_rule": "r"})


def test_errors_name_the_file(tmp_path):
    model, _ = model_and_batch("sdpa")
    with pytest.raises(ValueError, match="v.json.*41 tokens"):
        save_pretrained(model, tmp_path / "m", vocab_path=write_vocab(tmp_path / "v.json", 38))
    assert not (tmp_path / "m" / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "m")
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="teacher.safetensors"):
        load_encoder(tmp_path / "m", "teacher")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["model"]["d_model"] = 64
    meta["model"]["d_hid"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path / "m")
    meta["model"]["n_layer"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="n_layer"):
        from_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").glob(".*.tmp"))
