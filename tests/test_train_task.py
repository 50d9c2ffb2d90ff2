"""The training loop is task-generic (train/task.py): a toy regression task, unrelated to cells,
runs through the same loop as pre-training. Its per-epoch validation is called once per full
epoch and logged, its state survives a kill before a commit, and `finish` sees the whole history.

The toy task lives in tests/toy_task.py and runs as a real 1-rank DeepSpeed job in a subprocess
(the loop owns a process group, which must not outlive the job)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import cpu_env

from celljepa_dist.train.checkpoint import KILL_BEFORE_COMMIT_ENV, committed_checkpoints

TOY = Path(__file__).resolve().parent / "toy_task.py"


def _run(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOY), str(run_dir), *extra], env=cpu_env(env),
                          capture_output=True, text=True, timeout=300)


def _losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
def test_toy_task_trains_validates_each_epoch_and_resumes_its_state(tmp_path):
    whole = tmp_path / "whole"
    done = _run(whole)
    assert done.returncode == 0, done.stderr[-3000:]
    finished = json.loads((whole / "toy_finish.json").read_text())
    # 4 epochs of 8 batches: after_epoch ran once per epoch, at its last step, in order.
    assert [h["epoch"] for h in finished["history"]] == [0, 1, 2, 3]
    assert [h["step"] for h in finished["history"]] == [8, 16, 24, 32]
    mses = [h["val_mse"] for h in finished["history"]]
    assert mses[-1] < 0.5 * mses[0], mses  # it learns: the loop's optimiser steps reach the task's model
    assert [r["step"] for r in _losses(whole)] == list(range(1, 33))

    # Killed in the save of step 24 (epoch 2's end): the resume starts from step 16 and replays
    # epoch 2, so the task state must come from the step-16 checkpoint (two epochs of history).
    killed = tmp_path / "killed"
    first = _run(killed, env={KILL_BEFORE_COMMIT_ENV: "24"})
    assert first.returncode != 0
    assert [c.name for c in committed_checkpoints(killed / "checkpoints")][-1] == "step_00000016"
    state = json.loads((killed / "checkpoints" / "step_00000016" / "train_state.json").read_text())
    assert [h["epoch"] for h in state["task"]["history"]] == [0, 1] and state["task_name"] == "toy"
    second = _run(killed, "--resume", "auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((killed / "toy_finish.json").read_text()) == finished
    assert _losses(killed) == _losses(whole)
