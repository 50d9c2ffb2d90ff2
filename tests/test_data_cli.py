"""The data_tools command lines end to end: simulate -> vocab -> shards (2 concurrent jobs) -> validate."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(tool, *args):
    return subprocess.run([sys.executable, str(REPO / "data_tools" / tool), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.multiproc
def test_pipeline_with_concurrent_jobs_and_validation(tmp_path):
    r = cli("simulate_census.py", "--out", tmp_path / "census", "--cells", 1200, "--genes", 1200, "--seed", 2)
    assert r.returncode == 0, r.stderr
    r = cli("build_vocab.py", "--census-uri", tmp_path / "census", "--out", tmp_path / "vocab.json")
    assert r.returncode == 0, r.stderr
    common = ["--census-uri", tmp_path / "census", "--vocab", tmp_path / "vocab.json", "--cells-per-shard", 90,
              "--no-progress"]
    jobs = [subprocess.Popen([sys.executable, str(REPO / "data_tools" / "census_to_shards.py"), *map(str, common),
                              "--out", str(tmp_path / "par"), "--num-jobs", "2", "--job-index", str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for j in jobs:
        out, err = j.communicate(timeout=300)
        assert j.returncode == 0, err
    # one job, other TileDB read settings: the same bytes
    r = cli("census_to_shards.py", *common, "--out", tmp_path / "seq", "--tiledb-config", "sm.compute_concurrency_level=2",
            "--tiledb-config", "soma.init_buffer_bytes=65536")
    assert r.returncode == 0, r.stderr
    for name in ["manifest.json"] + [s["name"] for s in json.loads((tmp_path / "seq" / "manifest.json").read_text())["shards"]]:
        assert (tmp_path / "par" / name).read_bytes() == (tmp_path / "seq" / name).read_bytes(), name

    r = cli("validate_shards.py", tmp_path / "par", "--vocab", tmp_path / "vocab.json")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    # a flipped byte in a shard: non-zero exit naming the shard and the fault
    shard = tmp_path / "par" / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("validate_shards.py", tmp_path / "par")
    assert r.returncode == 1 and "shard-000002.tar" in r.stderr and "sha256" in r.stderr
    # the wrong vocabulary
    r = cli("build_vocab.py", "--census-uri", tmp_path / "census", "--out", tmp_path / "other.json")
    payload = json.loads((tmp_path / "other.json").read_text())
    payload["genes"] = payload["genes"][::-1]
    payload.pop("sha256")
    from celljepa_dist.data.vocab import content_sha256
    payload["sha256"] = content_sha256(payload)
    (tmp_path / "other.json").write_text(json.dumps(payload))
    r = cli("validate_shards.py", tmp_path / "seq", "--vocab", tmp_path / "other.json")
    assert r.returncode == 1 and "vocab sha256" in r.stderr
    r = cli("census_to_shards.py", *common[:2], "--vocab", tmp_path / "other.json", "--out", tmp_path / "seq",
            "--cells-per-shard", 90)
    assert r.returncode == 2 and "vocab_sha256" in r.stderr  # refuses to mix vocabularies in one output


def test_clear_errors_for_missing_inputs(tmp_path):
    r = cli("census_to_shards.py", "--census-uri", tmp_path / "nope", "--vocab", tmp_path / "v.json", "--out", tmp_path / "s")
    assert r.returncode == 2 and "v.json" in r.stderr
    r = cli("census_to_shards.py", "--census-uri", tmp_path, "--vocab", tmp_path / "v.json", "--out", tmp_path / "s",
            "--tiledb-config", "sm.compute_concurrency_level")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr and "sm.compute_concurrency_level" in r.stderr
    r = cli("validate_shards.py", tmp_path)
    assert r.returncode == 1 and "manifest not found" in r.stderr


@pytest.mark.multiproc  # two 2-rank pre-trainings
def test_demo_runs_and_reruns_idempotently(tmp_path):
    # Steps 1-10 (the main job); finetuning and perturbation have launch tests of their own
    # (tests/test_finetune_launch.py, tests/test_perturb_launch.py).
    cmd = [sys.executable, str(REPO / "launch" / "demo.py"), "--out", str(tmp_path / "demo"), "--cells", "2500",
           "--cells-per-shard", "300", "--skip", "finetune,perturb"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "validated" in r.stdout and (tmp_path / "demo" / "shards_summary.png").stat().st_size > 10_000
    shards = sorted((tmp_path / "demo" / "shards").glob("shard-*.tar"))
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shards} == before
