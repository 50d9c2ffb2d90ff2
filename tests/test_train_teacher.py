"""The EMA teacher beside a real DeepSpeed engine, 2 CPU ranks, ZeRO 1 and 3.

After k optimiser steps the gathered teacher must equal the closed-form EMA of the student's
gathered parameter history (computed here in float64), be identical on every rank, hold no
gradient, and survive a checkpoint round trip. This file is also the worker: the test launches
it under `deepspeed --num_gpus 2` with `--worker`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_helpers import cpu_env

from celljepa_dist.launching import deepspeed_launcher, free_port

STEPS = 4
MOMENTA = [0.5, 0.7, 0.9, 0.8]  # far from 1 so every step visibly moves the teacher


def _batch(seed: int, vocab_size: int):
    from celljepa_dist.data.collate import collate_cells, to_tensors

    rng = np.random.default_rng(seed)
    n_cells = 4
    lens = rng.integers(5, 12, n_cells)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    genes = np.concatenate([np.sort(rng.choice(np.arange(3, vocab_size), n, replace=False)) for n in lens])
    bins = rng.integers(1, 10, offsets[-1]).astype(np.uint8)
    return to_tensors(collate_cells(offsets, genes.astype(np.int32), bins, np.arange(n_cells) + 100 * seed,
                                    seed=seed, epoch=0, max_genes=16, mask_ratio=0.3))


def _overrides(stage: int) -> list[str]:
    return ["model.vocab_size=40", "model.d_model=16", "model.n_layers=2", "model.n_heads=2",
            "model.d_hid=16", "model.dropout=0.0", "data.batch_size=4", "data.shards_dir=unused",
            f"deepspeed.zero_stage={stage}", "optim.lr=0.01", "optim.weight_decay=0.0"]


def worker(out_dir: Path, stage: int) -> None:
    import deepspeed

    from celljepa_dist.config import load_config
    from celljepa_dist.model import CellJEPA, celljepa_loss, teacher_embedding
    from celljepa_dist.model.encoder import CellEncoder
    from celljepa_dist.train.engine import build_ds_config, init_distributed, initialize_engine
    from celljepa_dist.train.teacher import Teacher

    cfg = load_config(None, _overrides(stage))
    info = init_distributed(cfg)
    ds_config = build_ds_config(cfg, info.world_size)
    torch.manual_seed(0)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = CellJEPA(cfg.model)
    else:
        model = CellJEPA(cfg.model)
    engine, _, _ = initialize_engine(cfg, model, ds_config, steps_per_epoch=100)
    student = engine.module.student
    teacher = Teacher(student, stage, lambda: CellEncoder(cfg.model), ds_config, info.rank)

    def gathered_student():
        params = list(student.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().double().clone() for n, p in params}

    history = [gathered_student()]
    for k in range(STEPS):
        batch = _batch(seed=10 * k + info.rank, vocab_size=40)
        out = engine(batch)
        losses = celljepa_loss(out, batch, cfg.loss, teacher_embedding(teacher, batch))
        engine.backward(losses["loss"])
        engine.step()
        teacher.update(MOMENTA[k])
        history.append(gathered_student())

    state = teacher.full_state_dict()
    no_grad = all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
    teacher.save(out_dir / "teacher_ckpt")
    torch.distributed.barrier()
    fresh = Teacher(student, stage, lambda: CellEncoder(cfg.model), ds_config, info.rank)
    fresh.load(out_dir / "teacher_ckpt")
    reloaded = fresh.full_state_dict()
    torch.save({"history": history, "teacher": state, "reloaded": reloaded, "no_grad": no_grad},
               out_dir / f"rank{info.rank}.pt")


def closed_form_ema(history: list[dict], momenta: list[float]) -> dict:
    """T_K = prod(m) * S_0 + sum_k (1 - m_k) * prod_{j>k} m_j * S_k, in float64."""
    out = {}
    for name in history[0]:
        total = history[0][name] * float(np.prod(momenta))
        for k, m in enumerate(momenta):
            total = total + (1 - m) * float(np.prod(momenta[k + 1:])) * history[k + 1][name]
        out[name] = total
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [1, 3])
def test_teacher_is_closed_form_ema_on_every_rank(tmp_path, stage):
    env = cpu_env()
    cmd = deepspeed_launcher("--num_gpus", 2, "--master_port", free_port(), __file__, "--worker", tmp_path, stage)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # The student really moved (otherwise the EMA check would be vacuous).
    moved = max((r0["history"][-1][n] - r0["history"][0][n]).abs().max().item() for n in r0["history"][0])
    assert moved > 1e-3
    expected = closed_form_ema(r0["history"], MOMENTA)
    assert set(expected) == set(r0["teacher"])
    for name, want in expected.items():
        got0, got1 = r0["teacher"][name], r1["teacher"][name]
        assert got0.dtype == torch.float32, name
        torch.testing.assert_close(got0.double(), want, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(got0, got1), f"{name}: teacher differs between ranks"
        assert torch.equal(r0["reloaded"][name], got0), f"{name}: checkpoint round trip changed it"
    assert r0["no_grad"] and r1["no_grad"]

    # The offline export (no ranks) rebuilds the same teacher from the checkpoint files, bit for bit,
    # as DeepSpeed's own gather (GatheredParameters) did inside the run.
    from celljepa_dist.config import load_config
    from celljepa_dist.export import teacher_state_dict
    from celljepa_dist.model.encoder import CellEncoder

    template = CellEncoder(load_config(None, _overrides(stage)).model)
    exported = teacher_state_dict(tmp_path / "teacher_ckpt", template, world_size=2)
    assert exported.keys() == r0["teacher"].keys()
    for name, want in r0["teacher"].items():
        assert torch.equal(exported[name], want), f"{name}: offline export differs from the gathered teacher"


if __name__ == "__main__" and "--worker" in sys.argv:
    i = sys.argv.index("--worker")
    worker(Path(sys.argv[i + 1]), int(sys.argv[i + 2]))
