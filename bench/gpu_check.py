"""Every GPU check of the project in one device call, within a time budget (docs/gpu.md).

    python bench/gpu_wheels.py                         # here, once: gpu_wheels/ (what the GPU lacks)
    bash bench/gpu_check.sh                            # there: installs gpu_wheels/, then `run`
    python bench/gpu_check.py run --out DIR [--budget-s 450] [--dry-run]

Stages, in order, each a subprocess with its own time limit, cut to what is left of the budget (a
stage that cannot get its minimum is skipped, and says so):
  probe       bench/gpu_probe.py: GPU, versions, the aten flash ops' schema and lse layout
  pytest      `pytest -m gpu` on the attention tests: flash (aten), flex, sdpa vs reference
  step_bench  bench/step_bench.py --device cuda: attention fwd+bwd per backend, paper-size step
  shards      bench/gpu_shards.py: simulated cells -> shards (no TileDB there)
  zero1..3    1-GPU `deepspeed` pre-training of configs/pretrain_kidney.yaml per ZeRO stage
  resume      the ZeRO-1 run killed (SIGKILL) after its first checkpoint, then resumed
Outputs in DIR (at most 8 files, what a device call brings back): gpu_check.md (the tables for
BENCHMARKS.md), results.json, and the logs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from celljepa_dist.atomic import atomic_write_text  # noqa: E402
from celljepa_dist.launching import deepspeed_launcher, free_port  # noqa: E402

MAX_OUT_FILES = 8  # what one device call brings back
LOG_TAIL_BYTES = 2 * 2**20
GPU_TESTS = ("tests/test_flash_kernels.py", "tests/test_model_attention.py")  # the gpu tests that import
# on the GPU machine (the zero-shot one needs anndata)
WARMUP_STEPS = 5  # per-step rates after these (allocator, JIT, loader start)
# A DeepSpeed fused-Adam JIT build that fails (no nvcc or Python.h there) leaves torch's AdamW.
FUSED_ADAM_FAILURE = re.compile(r"fused_adam|Error building extension|Python\.h|CUDA_HOME", re.I)
TORCH_ADAM = "deepspeed.extra={optimizer: {params: {torch_adam: true}}}"


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float  # its own limit
    min_s: float  # not started with less left than this
    log: str  # the file of DIR its output goes to


STAGES = (
    Stage("probe", 60, 15, "probe.log"),
    Stage("pytest", 200, 60, "pytest.log"),
    Stage("step_bench", 120, 40, "step_bench.log"),
    Stage("shards", 90, 20, "train.log"),
    Stage("zero1", 120, 40, "train.log"),
    Stage("zero2", 80, 40, "train.log"),
    Stage("zero3", 90, 40, "train.log"),
    Stage("resume", 150, 60, "train.log"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
OUT_FILES = ("gpu_check.md", "results.json", "install.log") + tuple(dict.fromkeys(s.log for s in STAGES))


@dataclass
class Settings:
    out: Path
    work: Path
    budget_s: float
    config: Path
    cells: int
    genes: int
    steps: int
    checkpoint_every: int
    sets: tuple[str, ...] = ()
    stages: tuple[str, ...] = STAGE_NAMES
    dry_run: bool = False
    reserve_s: float = 10.0  # for the table at the end
    cap_scale: float = 1.0  # stage limits x this (a CPU rehearsal is many times slower)


def stage_timeout(stage: Stage, now: float, deadline: float, reserve_s: float, scale: float = 1.0) -> float | None:
    """Seconds this stage may run, or None when what is left is under its minimum (pure)."""
    left = deadline - now - reserve_s
    if left < stage.min_s * scale:
        return None
    return min(stage.cap_s * scale, left)


# ---- commands (pure) ----------------------------------------------------------------------------


def python() -> list[str]:
    return [sys.executable]


def probe_cmd(s: Settings) -> list[str]:
    return [*python(), str(REPO / "bench" / "gpu_probe.py"), "--json", str(s.work / "probe.json")]


def pytest_cmd(s: Settings) -> list[str]:
    return [*python(), "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", *GPU_TESTS]


def step_bench_cmd(s: Settings) -> list[str]:
    return [*python(), str(REPO / "bench" / "step_bench.py"), "--device", "cuda", "--skip-cpu-step",
            "--json", str(s.work / "step_bench.json")]


def shards_cmd(s: Settings) -> list[str]:
    return [*python(), str(REPO / "bench" / "gpu_shards.py"), "--out", str(s.work / "data"), "--cells", str(s.cells),
            "--genes", str(s.genes)]


def train_sets(s: Settings, run_dir: Path, zero: int, extra: tuple[str, ...] = (), every: int = 0) -> list[str]:
    """The overrides of one training run: the generated data, one epoch cut at `steps`, no
    checkpoint before the end unless `every`, then `--set`s of the command line and `extra`."""
    data = s.work / "data"
    return [f"run_dir={run_dir}", f"vocab={data / 'vocab.json'}", f"data.shards_dir={data / 'shards'}",
            f"max_steps={s.steps}", "epochs=1", f"checkpoint.every_steps={every}", "tracking.progress=false",
            f"deepspeed.zero_stage={zero}", *s.sets, *extra]


def train_cmd(s: Settings, run_dir: Path, zero: int, extra: tuple[str, ...] = (), every: int = 0) -> list[str]:
    cmd = deepspeed_launcher("--num_gpus", 1, "--master_port", free_port(), REPO / "bench" / "gpu_pretrain.py",
                             "--config", s.config)
    for item in train_sets(s, run_dir, zero, extra, every):
        cmd += ["--set", item]
    return [str(c) for c in cmd]


# ---- reading what the stages left (pure where possible) -----------------------------------------


def pytest_counts(text: str) -> dict[str, int]:
    """{'passed': n, 'failed': n, ...} from pytest's closing line."""
    lines = [ln for ln in text.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    if not lines:
        return {}
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", lines[-1])}


def train_figures(metrics: list[dict], warmup: int = WARMUP_STEPS) -> dict:
    """Median cells/s and MFU over the steps after `warmup`, and the peak memory, of a run's
    per-step metrics (bench/gpu_pretrain.py's step_metrics.jsonl)."""
    steps = [m for m in metrics if "cells_per_s" in m]
    timed = [m for m in steps if m["step"] > warmup] or steps
    if not timed:
        return {"steps": 0}
    out = {"steps": max(m["step"] for m in steps), "cells_per_s": statistics.median(m["cells_per_s"] for m in timed),
           "peak_memory_mb": max(m.get("memory_mb", 0.0) for m in steps)}
    if all("mfu" in m for m in timed):
        out["mfu"] = statistics.median(m["mfu"] for m in timed)
    return out


def loss_records(run_dir: Path) -> list[dict]:
    """Rank 0's committed per-step losses (run_dir/losses.jsonl), in file order."""
    path = run_dir / "losses.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in loss_records(run_dir)}


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in loss_records(run_dir)]


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[-1]) for p in (run_dir / "checkpoints").glob("step_*/COMMITTED"))


# ---- running ----------------------------------------------------------------------------------


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """(exit code or None on timeout, seconds); output appended to `log`. The whole process group
    is killed on timeout (DeepSpeed's launcher leaves its children otherwise)."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout), time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
            return None, time.perf_counter() - t0


def status_of(code: int | None) -> str:
    return "timeout" if code is None else ("ok" if code == 0 else f"failed (exit {code})")


class Runner:
    def __init__(self, s: Settings, env: dict | None = None):
        self.s, self.results, self.deadline = s, {"stages": {}}, time.monotonic() + s.budget_s
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH", "")]))
        self.torch_adam = False

    def log(self, stage: Stage) -> Path:
        return self.s.work / "logs" / stage.log

    def run_stage(self, stage: Stage) -> None:
        timeout = stage_timeout(stage, time.monotonic(), self.deadline, self.s.reserve_s, self.s.cap_scale)
        if timeout is None:
            self.results["stages"][stage.name] = {"status": "skipped (no time left in the budget)"}
            return
        print(f"[gpu_check] {stage.name} (up to {timeout:.0f} s)", flush=True)
        try:
            result = getattr(self, f"stage_{stage.name.rstrip('123')}")(stage, timeout)
        except Exception as err:  # one stage's failure must not lose the others' figures
            result = {"status": f"error ({type(err).__name__}: {str(err)[:300]})"}
        self.results["stages"][stage.name] = result
        print(f"[gpu_check] {stage.name}: {result.get('status')}", flush=True)

    def command(self, stage: Stage, cmd: list[str], timeout: float) -> dict:
        if self.s.dry_run:
            with open(self.log(stage), "a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
            return {"status": "dry-run", "command": cmd}
        code, seconds = run_logged(cmd, self.log(stage), timeout, self.env)
        return {"status": status_of(code), "seconds": round(seconds, 1)}

    def stage_probe(self, stage, timeout):
        result = self.command(stage, probe_cmd(self.s), timeout)
        path = self.s.work / "probe.json"
        if path.exists():
            result["probe"] = json.loads(path.read_text())
            cap = result["probe"].get("capability")
            if cap and "TORCH_CUDA_ARCH_LIST" not in self.env:  # DeepSpeed's JIT builds for this GPU only
                self.env["TORCH_CUDA_ARCH_LIST"] = cap
        return result

    def stage_pytest(self, stage, timeout):
        result = self.command(stage, pytest_cmd(self.s), timeout)
        if not self.s.dry_run:
            result["counts"] = pytest_counts(self.log(stage).read_text())
        return result

    def stage_step_bench(self, stage, timeout):
        result = self.command(stage, step_bench_cmd(self.s), timeout)
        path = self.s.work / "step_bench.json"
        if path.exists():
            result["figures"] = json.loads(path.read_text())
        return result

    def stage_shards(self, stage, timeout):
        return self.command(stage, shards_cmd(self.s), timeout)

    def _train(self, stage, timeout, run_dir: Path, zero: int) -> dict:
        extra = (TORCH_ADAM,) if self.torch_adam else ()
        start = time.monotonic()
        result = self.command(stage, train_cmd(self.s, run_dir, zero, extra), timeout)
        if result["status"].startswith("failed") and not self.torch_adam and not self.s.dry_run and \
                FUSED_ADAM_FAILURE.search(self.log(stage).read_text()[-20000:]):
            self.torch_adam = True  # measure the rest of the path with torch's AdamW, and say so
            shutil.rmtree(run_dir, ignore_errors=True)
            left = timeout - (time.monotonic() - start)
            result = self.command(stage, train_cmd(self.s, run_dir, zero, (TORCH_ADAM,)), max(left, 1.0))
        result["optimizer"] = "torch AdamW (fused Adam JIT build failed)" if self.torch_adam else "DeepSpeed default"
        return result

    def stage_zero(self, stage, timeout):
        zero = int(stage.name[-1])
        run_dir = self.s.work / "runs" / stage.name
        shutil.rmtree(run_dir, ignore_errors=True)
        result = self._train(stage, timeout, run_dir, zero)
        if not self.s.dry_run:
            from bench.gpu_pretrain import read_metrics

            result.update(train_figures(read_metrics(run_dir)))
        return result

    def stage_resume(self, stage, timeout):
        """Killed (SIGKILL, the whole launcher group) after the first commit, then `--resume auto`."""
        s = self.s
        run_dir = s.work / "runs" / "resume"
        shutil.rmtree(run_dir, ignore_errors=True)
        every = s.checkpoint_every
        extra = (TORCH_ADAM,) if self.torch_adam else ()
        cmd = train_cmd(s, run_dir, 1, extra, every)
        if s.dry_run:
            return self.command(stage, cmd, timeout)
        kill_after = every + max(2, every // 2)
        start, log = time.monotonic(), self.log(stage)
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}   # killed past step {kill_after}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=self.env,
                                    start_new_session=True)
            progress, killed_at = run_dir / "progress.json", None
            while time.monotonic() - start < timeout and proc.poll() is None:
                step = json.loads(progress.read_text())["step"] if progress.exists() else 0
                if step >= kill_after and every in committed_steps(run_dir):
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = step
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if killed_at is None:
            return {"status": f"failed: the run ended or timed out before step {kill_after} (see {log.name})"}
        before = committed_steps(run_dir)
        left = timeout - (time.monotonic() - start)
        resumed = self.command(stage, train_cmd(s, run_dir, 1, (*extra, "checkpoint.resume=auto"), every),
                               max(left, 1.0))
        steps = logged_steps(run_dir)
        result = {"killed_at": killed_at, "committed_before": before, "resume": resumed["status"],
                  "final_step": max(steps, default=0), "steps_logged_once": steps == list(range(1, s.steps + 1))}
        reference = losses_by_step(s.work / "runs" / "zero1")
        if reference and len(reference) == s.steps:  # the uninterrupted ZeRO-1 run of the same config
            got = losses_by_step(run_dir)
            result["max_abs_loss_diff_vs_zero1"] = max(abs(got[k] - reference[k]) for k in reference if k in got)
        ok = resumed["status"] == "ok" and result["steps_logged_once"] and s.steps in committed_steps(run_dir)
        result["status"] = "ok" if ok else "failed"
        return result

    def run(self, names=STAGE_NAMES) -> dict:
        s = self.s
        (s.work / "logs").mkdir(parents=True, exist_ok=True)
        self.results.update({"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": s.budget_s,
                             "config": str(s.config.relative_to(REPO) if s.config.is_relative_to(REPO) else s.config),
                             "cells": s.cells, "steps": s.steps, "dry_run": s.dry_run})
        for stage in STAGES:
            if stage.name in names:
                self.run_stage(stage)
        return self.results


# ---- the report -------------------------------------------------------------------------------


def _fmt(value, spec: str = ".0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def render_markdown(results: dict) -> str:
    """The tables for BENCHMARKS.md (pure)."""
    stages = results.get("stages", {})
    probe = stages.get("probe", {}).get("probe", {})
    lines = [f"## GPU check ({probe.get('gpu', 'no GPU seen')}, torch {probe.get('torch', '?')}, "
             f"CUDA {probe.get('torch_cuda', '?')}, {results.get('started', '?')})", "",
             "| check | status | details |", "| --- | --- | --- |"]
    lse = probe.get("lse", {})
    lines.append(f"| probe | {stages.get('probe', {}).get('status', 'not run')} | sm {probe.get('capability', '?')}, "
                 f"aten flash {probe.get('aten_flash_available', '?')}, schema {probe.get('aten_schema', '?')}, "
                 f"lse {lse.get('raw_lse_shape', '?')} ({lse.get('layout', lse.get('error', '?'))}), "
                 f"auto -> {probe.get('auto_kernel', '?')}, flash-attn {probe.get('flash_attn_installed', '?')} |")
    pt = stages.get("pytest", {})
    counts = ", ".join(f"{n} {k}" for k, n in pt.get("counts", {}).items()) or "-"
    lines.append(f"| pytest -m gpu | {pt.get('status', 'not run')} | {counts}; {_fmt(pt.get('seconds'))} s |")
    for name in ("shards", "zero1", "zero2", "zero3", "resume"):
        st = stages.get(name, {})
        lines.append(f"| {name} | {st.get('status', 'not run')} | {_fmt(st.get('seconds'))} s |")

    bench = stages.get("step_bench", {}).get("figures", {})
    attn = bench.get("attention_ms", {})
    lines += ["", "Attention fwd+bwd, one layer, B=64, L=601, d=512, 8 heads, bf16, 15% masked "
              f"(bench/step_bench.py --device cuda; {stages.get('step_bench', {}).get('status', 'not run')}):", "",
              "| backend | ms |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in attn.items()]
    step = bench.get("paper_step")
    if step:
        lines += ["", "Paper-size step without DeepSpeed (12 blocks, d=512, bf16 autocast, L=601):", "",
                  "| backend | B | cells/s | MFU | peak MiB |", "| --- | --- | --- | --- | --- |",
                  f"| {step['backend']} | {step['batch']} | {step['cells_per_s']:.0f} | "
                  f"{100 * step['mfu']:.1f}% of {step['peak_tflops']:.0f} TFLOP/s | {step['peak_memory_mb']:.0f} |"]

    lines += ["", f"1-GPU pre-training, `deepspeed` + launch/pretrain.py, {results.get('config')}, "
              f"{results.get('cells')} simulated cells, {results.get('steps')} steps, medians after step "
              f"{WARMUP_STEPS}:", "", "| ZeRO | status | cells/s | MFU | peak memory MiB | wall s | optimizer |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for zero in (1, 2, 3):
        st = stages.get(f"zero{zero}", {})
        mfu = f"{100 * st['mfu']:.1f}%" if "mfu" in st else "-"
        lines.append(f"| {zero} | {st.get('status', 'not run')} | {_fmt(st.get('cells_per_s'))} | {mfu} | "
                     f"{_fmt(st.get('peak_memory_mb'))} | {_fmt(st.get('seconds'))} | {st.get('optimizer', '-')} |")
    rs = stages.get("resume", {})
    if "killed_at" in rs:
        lines += ["", "Kill (SIGKILL) and `--resume auto`, ZeRO 1:", "",
                  "| killed at step | committed then | final step | every step logged once | "
                  "max abs loss diff vs uninterrupted |", "| --- | --- | --- | --- | --- |",
                  f"| {rs['killed_at']} | {rs['committed_before']} | {rs['final_step']} | {rs['steps_logged_once']} | "
                  f"{_fmt(rs.get('max_abs_loss_diff_vs_zero1'), '.3g')} |"]
    return "\n".join(lines) + "\n"


def write_outputs(s: Settings, results: dict) -> list[Path]:
    """gpu_check.md, results.json and the logs (their last LOG_TAIL_BYTES) in `s.out`."""
    s.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(s.out / "gpu_check.md", render_markdown(results))
    atomic_write_text(s.out / "results.json", json.dumps(results, indent=2, default=str))
    for log in sorted((s.work / "logs").glob("*.log")):
        data = log.read_bytes()[-LOG_TAIL_BYTES:]
        (s.out / log.name).write_bytes(data)
    files = sorted(p for p in s.out.iterdir() if p.is_file())
    unexpected = [p.name for p in files if p.name not in OUT_FILES]
    if len(files) > MAX_OUT_FILES or unexpected:
        raise RuntimeError(f"{s.out}: {len(files)} files ({', '.join(p.name for p in files)}); a device call brings "
                           f"back at most {MAX_OUT_FILES}, and only {', '.join(OUT_FILES)} belong there")
    return files


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the stages and write the report")
    r.add_argument("--out", required=True, help="report and logs (the device call's $OUT)")
    r.add_argument("--work", default=None, help="shards, runs, raw logs (default: a temp dir)")
    r.add_argument("--budget-s", type=float, default=450.0, help="for all the stages together")
    r.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma-separated subset, in the fixed order")
    r.add_argument("--config", default=str(REPO / "configs" / "pretrain_kidney.yaml"))
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every training run")
    r.add_argument("--cells", type=int, default=2048, help="simulated cells (batch 32: 64 steps per epoch)")
    r.add_argument("--genes", type=int, default=10_000, help="simulated genes (10k: most cells fill L=601)")
    r.add_argument("--steps", type=int, default=60, help="optimiser steps per training run")
    r.add_argument("--checkpoint-every", type=int, default=20, help="resume stage: commit every N steps")
    r.add_argument("--dry-run", action="store_true", help="write the plan and an empty report, run nothing")
    r.add_argument("--cap-scale", type=float, default=1.0, help="stage time limits x this (CPU rehearsals)")
    args = p.parse_args(argv)
    stages = tuple(x for x in args.stages.split(",") if x)
    unknown = sorted(set(stages) - set(STAGE_NAMES))
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; known: {', '.join(STAGE_NAMES)}")
    if args.steps <= args.checkpoint_every + 2:
        p.error(f"--steps {args.steps} leaves no room to kill past --checkpoint-every {args.checkpoint_every}")
    from celljepa_dist.config import load_config

    batch = load_config(args.config, list(args.sets)).data.batch_size
    if args.cells < batch * args.steps:
        p.error(f"--cells {args.cells}: {args.steps} steps of {batch} cells ({args.config}) need at least "
                f"{batch * args.steps}, one epoch")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    return Settings(out=Path(args.out), work=work, budget_s=args.budget_s, config=Path(args.config).resolve(),
                    cells=args.cells, genes=args.genes, steps=args.steps, checkpoint_every=args.checkpoint_every,
                    sets=tuple(args.sets), stages=tuple(x for x in args.stages.split(",") if x), dry_run=args.dry_run,
                    cap_scale=args.cap_scale)


def main(argv=None) -> int:
    args = parse_args(argv)
    s = settings_of(args)
    results = Runner(s).run(s.stages)
    files = write_outputs(s, results)
    print(render_markdown(results))
    print(f"gpu_check wrote {', '.join(p.name for p in files)} to {s.out}")
    failed = [n for n, r in results["stages"].items() if not str(r.get("status")).startswith(("ok", "dry-run"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
