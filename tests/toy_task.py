"""A toy regression task for tests/test_train_task.py: y = x @ w on 32 fixed points, a linear
model, validation MSE after every epoch, the history as task state. Usage:
    python tests/toy_task.py RUN_DIR [--resume auto]"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.config import TrackingConfig, TrainConfig, load_config
from celljepa_dist.train.loop import run
from celljepa_dist.train.task import Prepared, TaskBase


@dataclass
class ToyData:
    batch_size: int = 4
    n_points: int = 32

    def validate(self, where: str = "data") -> None:
        if self.n_points % self.batch_size:
            raise ValueError(f"{where}.n_points must be a multiple of {where}.batch_size")


@dataclass
class ToyConfig(TrainConfig):
    data: ToyData = field(default_factory=ToyData)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="toy", progress=False))


def toy_points(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.5, -2.0, 0.5])


class ToyLoader:
    def __init__(self, data: ToyData, epoch: int, start: int):
        x, y = toy_points(data.n_points)
        order = torch.randperm(data.n_points, generator=torch.Generator().manual_seed(epoch))
        self.x, self.y, self.bs, self.start = x[order], y[order], data.batch_size, start

    def __iter__(self):
        for i in range(self.start, len(self.x) // self.bs):
            sl = slice(i * self.bs, (i + 1) * self.bs)
            yield {"points": self.x[sl], "targets": self.y[sl]}

    def state_dict(self, consumed: int) -> dict:
        return {"start": self.start + consumed}

    def stats(self) -> dict[str, int]:
        return {"skipped_shards": 0, "skipped_cells": 0, "dropped_cells": 0}


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, batch):
        return self.lin(batch["points"]).squeeze(-1)


class ToyTask(TaskBase):
    name = "toy"

    def __init__(self):
        self.history: list[dict] = []

    def prepare(self, cfg, info) -> Prepared:
        return Prepared(cfg=cfg, vocab_path=None, vocab_sha256="none", tokenisation={},
                        data_identity={"n_points": cfg.data.n_points},
                        batches_per_epoch=cfg.data.n_points // cfg.data.batch_size // info.world_size,
                        cells_per_batch=cfg.data.batch_size, fingerprint_keys=("data.batch_size",))

    def build_model(self, cfg, ds_config):
        torch.manual_seed(cfg.seed)
        return Linear()

    def teacher(self, module, cfg):
        return None

    def open_loader(self, cfg, info, epoch, resume_state, prepared):
        return ToyLoader(cfg.data, epoch, (resume_state or {}).get("start", 0))

    def loss_terms(self, cfg):
        return ["loss"]

    def losses(self, out, batch, teacher, cfg):
        return {"loss": ((out - batch["targets"]) ** 2).mean()}

    def after_epoch(self, tr) -> dict[str, float]:
        x, y = toy_points(tr.cfg.data.n_points)
        with torch.no_grad():
            mse = float(((tr.engine.module({"points": x}) - y) ** 2).mean())
        self.history.append({"epoch": tr.state.epoch, "step": tr.state.step, "val_mse": mse})
        return {"val/mse": mse}

    def finish(self, tr) -> None:
        if tr.info.rank == 0:
            atomic_write_text(tr.run_dir / "toy_finish.json", json.dumps({"history": self.history}))

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))


def main(argv: list[str]) -> int:
    run_dir, rest = argv[0], argv[1:]
    sets = [f"run_dir={run_dir}", "epochs=4", "optim.lr=0.05", "optim.lr_decay_per_epoch=1.0", "deterministic=true",
            "checkpoint.every_steps=8", "checkpoint.keep_last=5", "deepspeed.zero_stage=1"]
    if rest[:1] == ["--resume"]:
        sets.append(f"checkpoint.resume={rest[1]}")
    cfg = load_config(None, sets, cls=ToyConfig)
    run(cfg, ToyTask())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
