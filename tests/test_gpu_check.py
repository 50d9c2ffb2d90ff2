"""The GPU check's CPU-side steps: the wheel list and its checks, argument parsing, the stage
budget, reading what stages leave, the report, a dry run, and (slow) a CPU rehearsal of the
shard, training and kill/resume stages with every import the GPU machine lacks refused."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check, gpu_wheels
from bench.gpu_pretrain import JsonlTracker, read_metrics

REPO = Path(__file__).resolve().parents[1]
GUARD = Path(__file__).parent / "device_guard"

# ---- wheels -----------------------------------------------------------------------------------


def test_wheel_list_is_pinned_to_this_environment_and_missing_from_the_gpu_image():
    versions = gpu_wheels.pins()
    assert set(versions) == set(gpu_wheels.WHEELS)
    assert not {gpu_wheels.normalize(n) for n in versions} & gpu_wheels.DEVICE_PACKAGES  # only what it lacks
    from importlib import metadata

    assert versions["deepspeed"] == metadata.version("deepspeed")


def test_download_commands_fetch_cp312_binaries_and_build_deepspeed_from_its_sdist(tmp_path):
    cmds = gpu_wheels.download_commands({"hjson": "3.1.0", "deepspeed": "0.19.8"}, tmp_path, python="py")
    binary, sdist, build = cmds
    assert binary[:4] == ["py", "-m", "pip", "download"] and "--no-deps" in binary and "--only-binary=:all:" in binary
    assert binary[binary.index("--python-version") + 1] == "3.12" and "manylinux_2_28_x86_64" in binary
    assert binary[-1] == "hjson==3.1.0" and "deepspeed==0.19.8" not in binary
    assert "--no-binary=:all:" in sdist and sdist[-1] == "deepspeed==0.19.8"
    assert build[3] == "wheel" and "--no-build-isolation" in build and "--no-index" in build
    assert build[build.index("-w") + 1] == str(tmp_path)


def _fake_wheel(dest: Path, name: str, version: str, size: int = 10) -> Path:
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pad", os.urandom(size))
    return path


def test_check_wheels_wants_exactly_one_wheel_per_pin_within_budget(tmp_path):
    pins = {"hjson": "3.1.0", "typing-inspection": "0.4.2"}
    _fake_wheel(tmp_path, "hjson", "3.1.0")
    with pytest.raises(ValueError, match="no wheel for typing-inspection"):
        gpu_wheels.check_wheels(tmp_path, pins)
    _fake_wheel(tmp_path, "typing_inspection", "0.4.2")  # wheel names spell '-' as '_'
    manifest = gpu_wheels.check_wheels(tmp_path, pins)
    assert [w["file"] for w in manifest["wheels"]] == ["hjson-3.1.0-py3-none-any.whl",
                                                       "typing_inspection-0.4.2-py3-none-any.whl"]
    with pytest.raises(ValueError, match="over the 0 MiB"):
        gpu_wheels.check_wheels(tmp_path, pins, budget_mb=0.0)
    stale = _fake_wheel(tmp_path, "hjson", "3.0.0")
    with pytest.raises(ValueError, match="hjson-3.0.0.*expected 3.1.0"):
        gpu_wheels.check_wheels(tmp_path, pins)
    stale.unlink()
    _fake_wheel(tmp_path, "mlflow", "3.0.0")
    with pytest.raises(ValueError, match="mlflow-3.0.0.*not in the wheel list"):
        gpu_wheels.check_wheels(tmp_path, pins)


def test_blocked_imports_are_what_the_gpu_machine_lacks():
    blocked = set(gpu_wheels.blocked_imports())
    assert {"mlflow", "tiledbsoma", "anndata", "scanpy", "sqlalchemy"} <= blocked  # not there, not carried
    assert not {"torch", "numpy", "pandas", "numba", "deepspeed", "webdataset", "pydantic", "celljepa_dist",
                "yaml", "safetensors"} & blocked
    # The image's packages bring their dependencies even where its list omits them.
    assert gpu_wheels.normalize("python-dateutil") in gpu_wheels.with_requirements(["pandas"])


def test_prepare_dry_run_prints_the_commands_and_fetches_nothing(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_wheels.py", "--dest", str(tmp_path / "w"), "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "pip download" in out.stdout and "pip wheel" in out.stdout and "deepspeed==" in out.stdout
    assert not (tmp_path / "w").exists()


# ---- stages, budget, parsing ---------------------------------------------------------------------


def test_stage_timeout_cuts_to_the_budget_and_skips_below_the_minimum():
    stage = gpu_check.Stage("x", cap_s=100, min_s=30, log="train.log")
    assert gpu_check.stage_timeout(stage, now=0, deadline=500, reserve_s=10) == 100
    assert gpu_check.stage_timeout(stage, now=0, deadline=80, reserve_s=10) == 70
    assert gpu_check.stage_timeout(stage, now=0, deadline=39, reserve_s=10) is None
    assert gpu_check.stage_timeout(stage, now=0, deadline=500, reserve_s=10, scale=3) == 300


def test_default_plan_fits_one_device_call_and_its_out_files():
    assert sum(s.min_s for s in gpu_check.STAGES) < 450 <= 8 * 60  # every stage can start within the budget
    assert len(gpu_check.OUT_FILES) <= gpu_check.MAX_OUT_FILES
    assert all(len(Path(f).parts) == 1 for f in gpu_check.OUT_FILES)


def test_parse_args_rejects_unknown_stages_and_too_few_cells(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["run", "--out", "o", "--stages", "probe,warp"])
    assert "unknown warp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["run", "--out", "o", "--cells", "100"])  # 60 steps x 32 cells
    assert "need at least 1920" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["run", "--out", "o", "--steps", "20", "--checkpoint-every", "20", "--cells", "9999"])
    args = gpu_check.parse_args(["run", "--out", "o", "--stages", "zero3,probe", "--set", "data.num_workers=2"])
    s = gpu_check.settings_of(args)
    assert s.stages == ("zero3", "probe") and s.sets == ("data.num_workers=2",) and s.config.is_absolute()


def test_train_command_is_a_one_gpu_deepspeed_launch_of_the_pretrain_wrapper(tmp_path):
    s = gpu_check.Settings(out=tmp_path / "o", work=tmp_path / "w", budget_s=100, config=REPO / "configs" / "x.yaml",
                           cells=2048, genes=100, steps=60, checkpoint_every=20, sets=("a.b=1",))
    cmd = gpu_check.train_cmd(s, tmp_path / "run", 3, ("c=2",), every=20)
    assert cmd[1:4] == ["-m", "deepspeed.launcher.runner", "--num_gpus"] and cmd[4] == "1"
    assert cmd[7].endswith("bench/gpu_pretrain.py")
    sets = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]
    assert "deepspeed.zero_stage=3" in sets and "checkpoint.every_steps=20" in sets and "max_steps=60" in sets
    assert sets[-2:] == ["a.b=1", "c=2"]  # the caller's overrides win


def test_pytest_counts_and_train_figures():
    assert gpu_check.pytest_counts("....\nFAILED x\n= 3 failed, 11 passed, 2 skipped in 9.1s =\n") == \
        {"failed": 3, "passed": 11, "skipped": 2}
    assert gpu_check.pytest_counts("no tests ran") == {}
    metrics = [{"step": i, "cells_per_s": 10.0 * i, "mfu": 0.01 * i, "memory_mb": 100.0 + i} for i in range(1, 10)]
    fig = gpu_check.train_figures(metrics, warmup=5)
    assert fig == {"steps": 9, "cells_per_s": 75.0, "peak_memory_mb": 109.0, "mfu": pytest.approx(0.075)}
    assert gpu_check.train_figures([]) == {"steps": 0}


def test_jsonl_tracker_buffers_until_flush_and_never_logs_a_step_twice(tmp_path):
    tr = JsonlTracker(tmp_path, resume=False)
    tr.log_step(1, {"loss": 2.0, "cells_per_s": 5})
    assert read_metrics(tmp_path) == []  # nothing before a commit
    tr.flush()
    tr.log_step(2, {"loss": 1.5})
    tr.drop_pending()  # a failed run's steps past the last commit
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert JsonlTracker(tmp_path, resume=True).last_logged_step() == 1
    assert JsonlTracker(tmp_path, resume=False).last_logged_step() == -1  # a fresh run starts a fresh file


# ---- the report -------------------------------------------------------------------------------

RESULTS = {
    "started": "2026-12-02 10:00:00 UTC", "config": "configs/pretrain_kidney.yaml", "cells": 2048, "steps": 60,
    "stages": {
        "probe": {"status": "ok", "probe": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
                                            "capability": "9.0", "aten_flash_available": True, "aten_schema": "ok",
                                            "auto_kernel": "aten", "flash_attn_installed": False,
                                            "lse": {"raw_lse_shape": [2, 9], "layout": "packed"}}},
        "pytest": {"status": "ok", "seconds": 80.2, "counts": {"passed": 9, "skipped": 1}},
        "step_bench": {"status": "ok", "figures": {
            "attention_ms": {"reference": 30.5, "flash/aten": 2.25, "flash/flash_attn": "unavailable (RuntimeError)"},
            "paper_step": {"backend": "flash/aten", "batch": 64, "cells_per_s": 1234.4, "mfu": 0.25,
                           "peak_tflops": 989.0, "peak_memory_mb": 20480.0}}},
        "zero1": {"status": "ok", "seconds": 40.0, "cells_per_s": 900.2, "mfu": 0.2, "peak_memory_mb": 5000.0,
                  "optimizer": "DeepSpeed default"},
        "zero3": {"status": "timeout", "seconds": 90.0},
        "resume": {"status": "ok", "killed_at": 25, "committed_before": [20], "final_step": 60,
                   "steps_logged_once": True, "max_abs_loss_diff_vs_zero1": 0.0012},
    },
}


def test_render_markdown_has_every_figure_and_says_what_did_not_run():
    md = gpu_check.render_markdown(RESULTS)
    assert md.startswith("## GPU check (NVIDIA H200, torch 2.11.0+cu130, CUDA 13.0, 2026-12-02 10:00:00 UTC)")
    assert "lse [2, 9] (packed), auto -> aten" in md
    assert "| pytest -m gpu | ok | 9 passed, 1 skipped; 80 s |" in md
    assert "| flash/aten | 2.25 |" in md and "| flash/flash_attn | unavailable (RuntimeError) |" in md
    assert "| flash/aten | 64 | 1234 | 25.0% of 989 TFLOP/s | 20480 |" in md
    assert "| 1 | ok | 900 | 20.0% | 5000 | 40 | DeepSpeed default |" in md
    assert "| 2 | not run | - |" in md and "| 3 | timeout | - |" in md
    assert "| 25 | [20] | 60 | True | 0.0012 |" in md
    for row in md.splitlines():  # a well-formed table row everywhere
        if row.startswith("|"):
            assert row.endswith("|")


def test_dry_run_writes_the_plan_and_the_report_only(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "run", "--out", str(out), "--work", str(work),
                           "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.md", "probe.log", "pytest.log", "results.json", "step_bench.log", "train.log"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == list(gpu_check.STAGE_NAMES)
    assert all(r["status"] == "dry-run" for r in results["stages"].values())
    for r in results["stages"].values():  # every script the plan names exists
        assert all((REPO / a).exists() for a in r["command"] if a.endswith(".py"))
    assert " -m pytest -m gpu " in (out / "pytest.log").read_text()
    assert not (work / "data").exists() and not (work / "runs").exists()


def test_write_outputs_refuses_more_files_than_a_device_call_brings_back(tmp_path):
    s = gpu_check.Settings(out=tmp_path / "o", work=tmp_path / "w", budget_s=1, config=REPO, cells=1, genes=1,
                           steps=1, checkpoint_every=0)
    (s.work / "logs").mkdir(parents=True)
    (s.work / "logs" / "train.log").write_text("x" * (gpu_check.LOG_TAIL_BYTES + 10))
    files = gpu_check.write_outputs(s, {"stages": {}})
    assert (s.out / "train.log").stat().st_size == gpu_check.LOG_TAIL_BYTES
    assert {p.name for p in files} == {"gpu_check.md", "results.json", "train.log"}
    (s.out / "stray.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match="stray.png"):
        gpu_check.write_outputs(s, {"stages": {}})


# ---- a CPU rehearsal of the device-side stages ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiproc
def test_cpu_rehearsal_of_shards_training_and_kill_resume_without_what_the_gpu_lacks(tmp_path):
    """The stages that need no GPU, for real (TileDB-free shards, a deepspeed launch of the
    pretrain wrapper, SIGKILL and --resume auto), with every import the GPU machine lacks refused
    (tests/device_guard): the wheel list and the lazy imports are complete. On CPU the resume is
    bit-identical to the uninterrupted run."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "CELLJEPA_BLOCKED_IMPORTS": ",".join(gpu_wheels.blocked_imports()),
           "PYTHONPATH": os.pathsep.join([str(GUARD), str(REPO)])}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "run", "--out", str(out), "--work", str(work),
                           "--stages", "shards,zero1,resume", "--config", "configs/tiny_cpu.yaml", "--cells", "200",
                           "--genes", "2000", "--steps", "12", "--checkpoint-every", "4", "--budget-s", "1500",
                           "--cap-scale", "6"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1600)
    results = json.loads((out / "results.json").read_text())["stages"]
    assert proc.returncode == 0, (results, (out / "train.log").read_text()[-5000:])
    assert results["zero1"]["steps"] == 12 and results["zero1"]["cells_per_s"] > 0
    resume = results["resume"]
    assert resume["committed_before"] == [4] and resume["killed_at"] >= 6
    assert resume["final_step"] == 12 and resume["steps_logged_once"]
    assert resume["max_abs_loss_diff_vs_zero1"] == 0.0
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "not on the GPU machine" not in log
    md = (out / "gpu_check.md").read_text()
    assert "| 1 | ok |" in md and f"| {resume['killed_at']} | [4] | 12 | True | 0 |" in md


def test_shell_entry_point_dry_run_reports_missing_wheels_and_writes_the_report(tmp_path):
    """bench/gpu_check.sh as the device call runs it, minus the wheels (an empty folder here)."""
    out, empty = tmp_path / "out", tmp_path / "no_wheels"
    empty.mkdir()
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WHEELS": str(empty), "PYTHON": sys.executable,
           "GPU_CHECK_BUDGET_S": "300"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--work", str(tmp_path / "work")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run 'python bench/gpu_wheels.py'" in (out / "install.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert 250 < results["budget_s"] <= 300  # what the install left of the budget
    assert len(list(out.iterdir())) <= gpu_check.MAX_OUT_FILES
