"""The training launchers end a user error with one line `PROG: error: ...` and status 2, not a
traceback (celljepa_dist/cli_errors.py); a bug keeps its traceback."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from launch_helpers import cpu_env, pretrain_argv

from celljepa_dist.cli_errors import run_cli

REPO = Path(__file__).resolve().parents[1]


def test_run_cli_turns_user_errors_into_one_line_and_keeps_bugs(capsys):
    def bad_config() -> int:
        raise ValueError("epochs: 0 must be >= 1")

    assert run_cli("pretrain", bad_config) == 2
    assert capsys.readouterr().err == "pretrain: error: epochs: 0 must be >= 1\n"

    def bug() -> int:
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        run_cli("pretrain", bug)


@pytest.mark.multiproc
@pytest.mark.parametrize("sets, culprit", [
    (["epochs=0"], "epochs"),  # refused while the config loads
    (["vocab=/nonexistent/vocab.json"], "/nonexistent/vocab.json"),  # refused after the process group started
])
def test_pretrain_launcher_prints_one_error_line(tmp_path, sets, culprit):
    argv = pretrain_argv(REPO / "configs" / "tiny_cpu.yaml", [f"run_dir={tmp_path / 'run'}", *sets])
    r = subprocess.run(argv, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "pretrain: error: " in r.stderr and culprit in r.stderr, r.stderr[-2000:]
