"""Launch paths and what a finished run leaves behind: torchrun + the scGPT baseline, the skip
policy for non-finite values, and the MLflow record of a run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from launch_helpers import PRETRAIN, cpu_env, torchrun_argv

from celljepa_dist.cpu_features import has_native_bf16
from celljepa_dist.launching import deepspeed_launcher, free_port

REPO = Path(__file__).resolve().parents[1]


def _sets(run_dir, shards, vocab, extra):
    out = []
    for s in [f"run_dir={run_dir}", f"vocab={vocab}", f"data.shards_dir={shards}", "tracking.progress=false",
              "data.batch_size=8"] + extra:
        out += ["--set", s]
    return out


def _run(cmd) -> subprocess.CompletedProcess:
    env = cpu_env()
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(saved["tracking_uri"])
    return client, client.get_run(saved["run_id"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_torchrun_scgpt_baseline_run_is_complete(tiny_shards, tmp_path):
    shards, vocab = tiny_shards
    run_dir = tmp_path / "scgpt"
    cmd = torchrun_argv(PRETRAIN, REPO / "configs" / "tiny_cpu.yaml", [])
    cmd += _sets(run_dir, shards, vocab, ["objective=scgpt", "max_steps=6", "checkpoint.every_steps=3",
                                          "tracking.peak_tflops=0.05"])
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["final_step"] == 6
    ckpt = Path(result["checkpoint"])
    assert (ckpt / "COMMITTED").exists() and not (ckpt / "teacher").exists()  # no teacher for scgpt
    assert {p.name for p in ckpt.glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == list(range(1, 7))
    # scGPT's pre-training objective: GEP + GEPC (weight 1 by default), no JEPA term
    assert all("loss_jepa" not in r and r["loss"] == pytest.approx(r["loss_rec"] + r["loss_mvc"]) for r in losses)

    client, run = _mlflow_run(run_dir)
    assert run.data.tags["objective"] == "scgpt" and run.data.tags["world_size"] == "2"
    assert len(run.data.tags["git_sha"]) == 40
    assert run.data.params["objective"] == "scgpt" and run.data.params["optim.lr"] == "0.001"
    for key in ("loss", "loss_rec", "loss_mvc", "lr", "grad_norm", "cells_per_s", "tokens_per_s", "memory_mb", "mfu",
                "final/loss", "final/loss_mvc"):
        assert key in run.data.metrics, key
    assert "ema_momentum" not in run.data.metrics and "loss_jepa" not in run.data.metrics
    assert 0 < run.data.metrics["mfu"] < 1 and run.data.metrics["grad_norm"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ds_config.json", "vocab.json", "loss_curves.png"} <= artifacts
    # The export carries the GEPC head, and its config says so.
    from celljepa_dist.model.pretrained import from_pretrained

    assert from_pretrained(run_dir / "model").mvc_head is not None


@pytest.mark.multiproc
@pytest.mark.slow
def test_skip_policy_skips_nonfinite_steps_and_finishes(tiny_shards, tmp_path):
    """Under `skip`, DeepSpeed (ZeRO-1) drops the optimiser step of a non-finite gradient; the run
    goes on, the teacher is not updated from a skipped step, and nothing non-finite is saved."""
    shards, vocab = tiny_shards
    run_dir = tmp_path / "skip"
    cmd = deepspeed_launcher("--num_gpus", 2, "--master_port", free_port(), REPO / "launch" / "pretrain.py") + [
           "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    cmd += _sets(run_dir, shards, vocab, ["nonfinite_policy=skip", "max_steps=5", "optim.lr=1e30",
                                          "optim.grad_clip=0", "checkpoint.every_steps=0"])
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, run = _mlflow_run(run_dir)
    applied = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "step_applied"), key=lambda m: m.step)]
    assert len(applied) == 5 and applied[0] == 1.0 and 0.0 in applied
    teacher = torch.load(run_dir / "checkpoints" / "step_00000005" / "teacher" / "teacher.pt",
                         weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in teacher.values())


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "fp32"), (1, "bf16"), (3, "bf16")])
def test_every_zero_stage_and_precision_trains_and_checkpoints(tiny_shards, tmp_path, stage, precision):
    shards, vocab = tiny_shards
    run_dir = tmp_path / f"z{stage}_{precision}"
    cmd = deepspeed_launcher("--num_gpus", 2, "--master_port", free_port(), REPO / "launch" / "pretrain.py") + [
           "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    cmd += _sets(run_dir, shards, vocab, [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                                          "max_steps=4", "checkpoint.every_steps=2"])
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # bf16 on a CPU that emulates it is ~20x slower than fp32: the run says so (cpu_features.py).
    assert ("bf16 matmuls are emulated" in proc.stdout) == (precision == "bf16" and not has_native_bf16())
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_jepa"]])).all() for r in losses)
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert (ckpt / "COMMITTED").exists()
    teacher_files = sorted(p.name for p in (ckpt / "teacher").iterdir())
    assert teacher_files == (["shard_rank000.pt", "shard_rank001.pt"] if stage == 3 else ["teacher.pt"])
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage and ds_config["bf16"]["enabled"] == (precision == "bf16")
    # Every stage and precision exports: fp32 weights, the teacher, loadable without DeepSpeed.
    from celljepa_dist.model.pretrained import from_pretrained, load_encoder, load_meta

    meta = load_meta(run_dir / "model")
    assert meta["source"]["zero_stage"] == stage and meta["source"]["step"] == 4
    model = from_pretrained(run_dir / "model")
    teacher = load_encoder(run_dir / "model", "teacher")
    for module in (model, teacher):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    # A bf16 run exports the fp32 master weights, not the bf16 module copy.
    assert "fp32 master" in meta["source"]["student_weights"] or (stage == 0 and precision == "fp32")
    module_file = ckpt / "engine" / "engine" / "mp_rank_00_model_states.pt"
    if precision == "bf16" and stage < 3:  # ...and the module copy is exactly their bf16 rounding
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        for k, v in model.state_dict().items():
            assert module[k].dtype == torch.bfloat16 and torch.equal(v.to(torch.bfloat16), module[k]), k
    if stage < 3 and precision == "fp32":  # fp32: the module copy is the master
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        assert all(torch.equal(v, module[k]) for k, v in model.state_dict().items())


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_nodes_without_ssh_one_launcher_per_node(tiny_shards, tmp_path):
    """`deepspeed --no_ssh --node_rank I` per node (as the SLURM script does), two 'nodes' on
    localhost with one rank each: one job of world size 2."""
    shards, vocab = tiny_shards
    run_dir = tmp_path / "twonode"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = str(free_port())
    env = cpu_env()
    procs = []
    for node in (0, 1):
        cmd = deepspeed_launcher() + ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", port, str(REPO / "launch" / "pretrain.py"),
               "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
        cmd += _sets(run_dir, shards, vocab, ["max_steps=4", "checkpoint.every_steps=2"])
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    _, run = _mlflow_run(run_dir)
    assert run.data.tags["world_size"] == "2"
    assert {p.name for p in (run_dir / "checkpoints" / "step_00000004").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
