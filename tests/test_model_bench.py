"""The step benchmark runs end to end at toy size and prints its contract line."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_bench_toy_size_prints_contract_line():
    out = subprocess.run(
        [sys.executable, "bench/step_bench.py", "--batch-size", "4", "--seq-len", "33", "--d-model", "32",
         "--n-layers", "1", "--n-heads", "4", "--vocab-size", "100", "--reps", "1", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"step_bench cells_per_s=[0-9.]+ ratio_vs_naive=[0-9.]+", lines[-1]), lines[-1]
    check = next(ln for ln in lines if ln.startswith("same model check"))
    assert float(check.rsplit("=", 1)[1]) < 1e-4  # the baseline computes the same function
