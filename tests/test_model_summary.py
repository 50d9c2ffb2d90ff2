"""Parameter counts of the paper config against the closed-form count of scGPT's layers."""
import subprocess
import sys
from pathlib import Path

from celljepa_dist.model import ModelConfig
from celljepa_dist.model.summary import parameter_table

REPO = Path(__file__).resolve().parents[1]


def test_paper_counts_match_formula():
    cfg = ModelConfig.from_yaml(REPO / "configs/model/paper.yaml").replace(vocab_size=60664)
    d, f, n, vocab = 512, 512, 12, 60664
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    gene = vocab * d + 2 * d
    value = (d + d) + (d * d + d) + 2 * d
    table = dict(parameter_table(cfg))
    assert table[f"transformer blocks (12 x {per_block:,})"] == n * per_block
    assert table["gene embedding (table + LayerNorm)"] == gene
    assert table["= encoder (student; the teacher is a copy)"] == gene + value + n * per_block


def test_summary_cli_prints_the_encoder_size():
    out = subprocess.run([sys.executable, "-m", "celljepa_dist.model.summary", "--config", "configs/model/paper.yaml",
                          "--vocab-size", "60664"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "50,261,504" in out.stdout and "31,060,992" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "celljepa_dist.model.summary", "--config", "configs/model/paper.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "vocab" in bad.stderr
