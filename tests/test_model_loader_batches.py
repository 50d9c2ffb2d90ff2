"""The model on real loader batches (real shards through the real webdataset loader): the batch
contract holds, every backend agrees, and a training step runs."""
import pytest
import torch

from celljepa_dist.model import CellJEPA, LossConfig, ModelConfig, celljepa_loss, make_teacher, teacher_embedding


def first_batch(tiny_shards, known_first):
    from celljepa_dist.data.stream import LoaderConfig, build_loader

    shards_dir, vocab_path = tiny_shards
    cfg = LoaderConfig(shards_dir=str(shards_dir), batch_size=12, max_genes=400, mask_ratio=0.3, num_workers=0,
                       known_first=known_first, vocab_path=str(vocab_path))
    loader, _ = build_loader(cfg, rank=0, world_size=1, epoch=0)
    return next(iter(loader)), vocab_path


@pytest.mark.parametrize("known_first", [False, True])
def test_backends_agree_on_loader_batches(tiny_shards, known_first):
    from celljepa_dist.data.vocab import GeneVocab

    batch, vocab_path = first_batch(tiny_shards, known_first)
    vocab = GeneVocab.load(vocab_path)
    assert batch["value_mask"].any() and batch["padding_mask"].any()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=2, n_heads=4, d_hid=32, dropout=0.0,
                      flash_kernel="torch")
    model = CellJEPA(cfg)
    teacher = make_teacher(model.student)
    t_cls = teacher_embedding(teacher, batch)
    results = {}
    for backend in ("reference", "sdpa", "flash"):
        model.student.backend = backend
        model.zero_grad()
        losses = celljepa_loss(model(batch), batch, LossConfig(), t_cls)
        losses["loss"].backward()
        results[backend] = (losses["loss"].item(), model.student.blocks[0].attn.qkv.weight.grad.clone())
        assert all(torch.isfinite(v) for v in losses.values())
    for backend in ("sdpa", "flash"):
        assert results[backend][0] == pytest.approx(results["reference"][0], rel=1e-5)
        torch.testing.assert_close(results[backend][1], results["reference"][1], atol=1e-4, rtol=1e-4)
