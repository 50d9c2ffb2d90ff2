"""Offline export: the ZeRO-3 consolidation rule over a grid of sizes, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from celljepa_dist.export import ExportError, consolidate_zero3, export_checkpoint

REPO = Path(__file__).resolve().parents[1]


def zero3_slices(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """DeepSpeed's partitioning of one parameter (partition_parameters.py): pad the flat tensor
    to a multiple of the world size, rank r holds the r-th equal slice."""
    flat = t.reshape(-1)
    size = -(-flat.numel() // world)
    padded = torch.cat([flat, torch.zeros(size * world - flat.numel())])
    return [padded[r * size:(r + 1) * size].clone() for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_zero3_consolidation_inverts_the_partitioning(world):
    torch.manual_seed(world)
    template = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 1), torch.nn.LayerNorm(1))
    per_param = [zero3_slices(p.detach(), world) for p in template.parameters()]
    shards = [[slices[r] for slices in per_param] for r in range(world)]
    got = consolidate_zero3(shards, template)
    for name, p in template.named_parameters():
        assert torch.equal(got[name], p.detach()), name


def test_consolidation_refuses_short_or_mismatched_shards():
    template = torch.nn.Linear(4, 4)
    with pytest.raises(ExportError, match="rank 0: 1 tensors for 2 parameters"):
        consolidate_zero3([[torch.zeros(8)]], template)
    with pytest.raises(ExportError, match="weight: 3 values"):
        consolidate_zero3([[torch.zeros(3), torch.zeros(4)]], template)


def test_errors_name_the_checkpoint(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_00000005"
    step.mkdir(parents=True)
    with pytest.raises(ExportError, match="not a committed checkpoint"):
        export_checkpoint(step, tmp_path / "out")
    (step / "COMMITTED").write_text("{}")
    (step / "train_state.json").write_text("{not json")
    with pytest.raises(ExportError, match="train_state.json: unreadable"):
        export_checkpoint(step, tmp_path / "out")
    (step / "train_state.json").write_text(json.dumps({"step": 5, "world_size": 1, "model": {"vocab_size": 40}}))
    with pytest.raises(ExportError, match="vocab.json is missing"):
        export_checkpoint(step, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), "--checkpoint",
                           str(tmp_path / "run"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "export: error:" in proc.stderr and "vocab.json" in proc.stderr
