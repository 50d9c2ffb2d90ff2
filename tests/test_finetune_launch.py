"""Real finetuning runs through launch/finetune.py (DeepSpeed on CPU ranks, gloo, a real MLflow
store): the end-to-end products of a run, the scgpt objective, SIGKILL + resume bit for bit on 2
ranks, and the errors of bad input (checked by the task's own setup, no engine needed)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from finetune_helpers import PRETRAIN_W_JEPA, build_init, labelled_counts
from launch_helpers import FINETUNE, assert_bit_identical, cpu_env, finetune_argv, kill_job_at_step, torchrun_argv

from celljepa_dist.finetune.config import load_finetune_config
from celljepa_dist.finetune.task import FinetuneTask
from celljepa_dist.train.engine import DistInfo

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "finetune_tiny_cpu.yaml"
# labelled_counts(300): 4 types of 75 cells; round(0.1 * 75) = 8 validation cells each.
N_VAL = 4 * 8
N_TRAIN = 300 - N_VAL


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A celljepa init (with a parent MLflow run beside it), a teacher-less scgpt init, labelled cells."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("ft")
    init = build_init(root / "pre_celljepa")
    scgpt_init = build_init(root / "pre_scgpt", teacher=False, seed=1)
    store = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    (root / "runs").mkdir()
    client = MlflowClient(tracking_uri=store)
    parent = client.create_run(client.create_experiment("pretrain-parent")).info.run_id
    (root / "pre_celljepa" / "mlflow_run.json").write_text(json.dumps({"run_id": parent, "tracking_uri": store}))
    cells = root / "cells.h5ad"
    labelled_counts(n_cells=300).write_h5ad(cells)
    return {"root": root, "init": init, "scgpt_init": scgpt_init, "cells": cells, "store": store, "parent": parent}


def run_cli(argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


def sets_for(inputs, run_dir: Path, *extra: str) -> list[str]:
    return [f"init={inputs['init']}", f"data.h5ad={inputs['cells']}", f"run_dir={run_dir}",
            f"tracking.uri={inputs['store']}", *extra]


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_finetuning_run_trains_exports_embeds_and_evaluates(inputs):
    from mlflow.tracking import MlflowClient

    from celljepa_dist.model.pretrained import from_pretrained, load_meta

    run_dir = inputs["root"] / "runs" / "celljepa"
    done = run_cli(finetune_argv(CONFIG, sets_for(inputs, run_dir, "epochs=2", "data.batch_size=32")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finetune done" in done.stdout and "val_avgbio_finetuned=" in done.stdout
    result = json.loads((run_dir / "finetune_result.json").read_text())
    assert result["train_cells"] == N_TRAIN and result["val_cells"] == N_VAL
    assert set(result["avgbio"]) == {"val", "all"}
    assert set(result["avgbio"]["val"]) == {"X_pca", "X_finetuned", "X_finetuned_teacher", "X_zero_shot"}
    for split in ("val", "all"):
        assert (run_dir / "eval" / split / "umap.png").stat().st_size > 0
        assert "loses to PCA" in (run_dir / "eval" / split / "metrics.md").read_text() or \
            "beats PCA" in (run_dir / "eval" / split / "metrics.md").read_text()
    # The run trained what the paper trains: GEP + GEPC + ECS + JEPA, the JEPA weight inherited.
    assert set(losses(run_dir)[0]) == {"step", "epoch", "loss", "loss_rec", "loss_jepa", "loss_mvc", "loss_ecs"}
    import yaml

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["loss"]["w_jepa"] == PRETRAIN_W_JEPA and resolved["model"]["use_mvc"] is True
    # The exported model: the init's architecture and vocab, new weights, a GEPC head and a teacher.
    meta = load_meta(result["model"])
    assert meta["has_teacher"] and meta["vocab_sha256"] == load_meta(inputs["init"])["vocab_sha256"]
    tuned, init = from_pretrained(result["model"]), from_pretrained(inputs["init"])
    assert tuned.mvc_head is not None
    assert not torch.equal(tuned.student.embed.gene.embedding.weight, init.student.embed.gene.embedding.weight)
    # MLflow: the epoch's validation losses, the evaluation, the parent pre-training run.
    client = MlflowClient(tracking_uri=inputs["store"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "finetune"
    assert run.data.tags["mlflow.parentRunId"] == inputs["parent"] == result["parent_run"]["run_id"]
    steps_per_epoch = N_TRAIN // 32
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss_rec")] == \
        [steps_per_epoch, 2 * steps_per_epoch]
    assert run.data.metrics["eval/cells_val/X_finetuned/avgbio"] == pytest.approx(result["avgbio"]["val"]["X_finetuned"])
    assert run.data.params["init"] == str(inputs["init"])
    split = (run_dir / "split.csv").read_text().splitlines()
    assert len(split) == 301 and sum(line.endswith(",val") for line in split) == N_VAL


@pytest.mark.multiproc
def test_the_scgpt_objective_has_no_teacher_and_scgpt_ecs_needs_no_labels(inputs):
    run_dir = inputs["root"] / "runs" / "scgpt"
    sets = sets_for(inputs, run_dir, "objective=scgpt", "loss.ecs_style=scgpt", "max_steps=4", "eval.enabled=false")
    sets[0] = f"init={inputs['scgpt_init']}"
    done = run_cli(finetune_argv(CONFIG, sets))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert set(losses(run_dir)[0]) == {"step", "epoch", "loss", "loss_rec", "loss_mvc", "loss_ecs"}
    assert not (run_dir / "model" / "teacher.safetensors").exists()
    assert "avgbio" not in json.loads((run_dir / "finetune_result.json").read_text())


def prepare(inputs, tmp_path, *sets):
    cfg = load_finetune_config(CONFIG, sets_for(inputs, tmp_path / "run", *sets))
    (tmp_path / "run").mkdir(exist_ok=True)
    return FinetuneTask().prepare(cfg, DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo"))


def test_bad_input_is_named_before_any_engine_starts(inputs, tmp_path):
    from celljepa_dist.data.vocab import GeneVocab

    prepared = prepare(inputs, tmp_path)
    assert prepared.cfg.loss.w_jepa == PRETRAIN_W_JEPA and prepared.data_identity["total_cells"] == N_TRAIN
    with pytest.raises(ValueError, match=r"label key 'celltype' is not an obs column"):
        prepare(inputs, tmp_path, "data.label_key=celltype")
    lonely = labelled_counts(n_cells=60)
    lonely.obs["cell_type"] = lonely.obs["cell_type"].astype(str)
    lonely.obs.iloc[3, 0] = "Platelet"
    lonely.write_h5ad(tmp_path / "lonely.h5ad")
    with pytest.raises(ValueError, match=r"lonely.h5ad: obs\['cell_type'\] label\(s\) \['Platelet'\] have a single cell"):
        prepare(inputs, tmp_path, f"data.h5ad={tmp_path / 'lonely.h5ad'}")
    other = GeneVocab.from_genes([f"ENSG8{i:010d}" for i in range(50)], [f"X{i}" for i in range(50)])
    other.save(tmp_path / "other_vocab.json")
    with pytest.raises(ValueError, match="a finetuned model keeps its pre-trained vocabulary"):
        prepare(inputs, tmp_path, f"vocab={tmp_path / 'other_vocab.json'}")
    with pytest.raises(ValueError, match="has no EMA teacher"):
        prepare(inputs, tmp_path, f"init={inputs['scgpt_init']}")
    with pytest.raises(ValueError, match="cannot find the JEPA weight"):
        lost = build_init(tmp_path / "lost")
        (tmp_path / "lost" / "config.yaml").unlink()
        prepare(inputs, tmp_path, f"init={lost}")


@pytest.mark.multiproc
def test_missing_teacher_is_a_clear_cli_error(inputs):
    run_dir = inputs["root"] / "runs" / "no_teacher"
    sets = sets_for(inputs, run_dir)
    sets[0] = f"init={inputs['scgpt_init']}"
    done = run_cli(finetune_argv(CONFIG, sets))
    assert done.returncode != 0
    assert "has no EMA teacher" in done.stderr and "objective=scgpt" in done.stderr
    assert not (run_dir / "checkpoints").exists()


KILL_SETS = ["epochs=2", "data.batch_size=8", "checkpoint.every_steps=10", "checkpoint.keep_last=2",
             "deterministic=true", "deepspeed.zero_stage=1", "deepspeed.precision=fp32", "eval.enabled=false"]


def final_weights(run_dir: Path, step: int) -> tuple[dict, dict]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = run_dir / "checkpoints" / f"step_{step:08d}"
    student = get_fp32_state_dict_from_zero_checkpoint(str(d / "engine"), tag="engine")
    teacher = torch.load(d / "teacher" / "teacher.pt", map_location="cpu", weights_only=True)["state_dict"]
    return student, teacher


def mlflow_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    return sorted((m.step, m.value) for m in MlflowClient(saved["tracking_uri"]).get_metric_history(saved["run_id"], key))


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(inputs):
    """fp32, 2 ranks: killed 3+ steps past the commit at step 10, resumed: the same losses every
    step, the same validation metrics, bit-identical student and (EMA) teacher. The reference run
    goes through torchrun, the killed one through the deepspeed launcher: both launch paths give
    the same run."""
    ref_dir, kill_dir = inputs["root"] / "runs" / "ref", inputs["root"] / "runs" / "killed"
    per_epoch = N_TRAIN // 16
    total = 2 * per_epoch
    ref = run_cli(torchrun_argv(FINETUNE, CONFIG, sets_for(inputs, ref_dir, *KILL_SETS)))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    killed_at = kill_job_at_step(finetune_argv(CONFIG, sets_for(inputs, kill_dir, *KILL_SETS), ranks=2),
                                 kill_dir, step=13, timeout_s=400)
    assert 13 <= killed_at < per_epoch, f"killed at step {killed_at}: not mid-epoch past the checkpoint"
    assert sorted(p.parent.name for p in (kill_dir / "checkpoints").glob("*/COMMITTED")) == ["step_00000010"]

    resumed = run_cli(finetune_argv(CONFIG, sets_for(inputs, kill_dir, *KILL_SETS, "checkpoint.resume=auto"),
                                    ranks=2))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000010" in resumed.stdout
    assert losses(kill_dir) == losses(ref_dir) and [r["step"] for r in losses(ref_dir)] == list(range(1, total + 1))
    ref_student, ref_teacher = final_weights(ref_dir, total)
    got_student, got_teacher = final_weights(kill_dir, total)
    assert_bit_identical(ref_student, got_student, "student")
    assert_bit_identical(ref_teacher, got_teacher, "teacher")
    assert not torch.equal(ref_teacher["embed.gene.embedding.weight"], ref_student["student.embed.gene.embedding.weight"])
    assert [s for s, _ in mlflow_history(kill_dir, "loss")] == list(range(1, total + 1))  # each step once
    val = mlflow_history(ref_dir, "val/loss_rec")
    assert [s for s, _ in val] == [per_epoch, total] and mlflow_history(kill_dir, "val/loss_rec") == val
    assert (kill_dir / "split.csv").read_text() == (ref_dir / "split.csv").read_text()
