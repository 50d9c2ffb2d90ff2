"""A committed checkpoint -> a `save_pretrained` directory, offline: no DeepSpeed ranks, any ZeRO
stage, any world size.

* Student (+ heads): the fp32 master weights. ZeRO 1-3 and bf16 runs keep them partitioned in the
  optimiser files; DeepSpeed's own `zero_to_fp32` consolidates them. A plain ZeRO-0 fp32/fp16 run
  has no optimiser partitions: its module weights are the weights (cast to fp32 for fp16).
* EMA teacher: `teacher/teacher.pt` (ZeRO 0-2, a full fp32 state dict) or one
  `teacher/shard_rank{r}.pt` per rank (ZeRO-3: each parameter's flat `ds_tensor` slice, in
  parameter order). ZeRO-3 pads every parameter to a multiple of the world size and gives rank r
  the r-th equal slice, so concatenating the slices in rank order and cutting at numel is the
  parameter (`consolidate_zero3`).
* The files are checked against the checksums recorded at commit first (when it recorded them).
* Model config, vocab hash and tokenisation come from the checkpoint's `train_state.json`
  (`model`, `vocab_sha256`, `data`); the vocab file is the run's `vocab.json`, checked by hash.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from celljepa_dist.model.cell_jepa import CellJEPA
from celljepa_dist.model.config import ModelConfig
from celljepa_dist.model.encoder import CellEncoder
from celljepa_dist.model.pretrained import save_pretrained
from celljepa_dist.tokens import accept_legacy_token_keys
from celljepa_dist.train.checkpoint import COMMIT_MARKER, ENGINE_TAG
from celljepa_dist.train.checksums import CHECKSUMS_FILE, file_digest, verify_share

MODEL_DIR_NAME = "model"  # RUN_DIR/model/: where pre-training leaves its export


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportResult:
    out: Path
    step: int
    zero_stage: int
    world_size: int
    has_teacher: bool
    student_weights: str  # where the student's weights came from (fp32 master or module)


def verify_checksums(ckpt_dir: Path) -> None:
    """Every file against the checksums recorded at commit (checkpoints written before them: not
    checked). Reads the checkpoint once more; an export must not publish corrupt weights."""
    problems = verify_share(ckpt_dir)
    if problems:
        raise ExportError(f"checkpoint {ckpt_dir}: corrupt: {'; '.join(problems)}. Export another committed "
                          "checkpoint of the run (its checkpoints/step_N directories)")


def checkpoint_identity(ckpt_dir: Path) -> str | None:
    """sha256 of the checkpoint's CHECKSUMS.json: names its exact content (a later save of the same
    step has another), so a model dir can tell which commit it was exported from. None for
    checkpoints written before checksums."""
    manifest = ckpt_dir / CHECKSUMS_FILE
    return file_digest(manifest) if manifest.is_file() else None


def exported_from(model_dir: Path, ckpt_dir: Path) -> bool:
    """`model_dir` is already the complete export of this very commit of `ckpt_dir` (config.json
    is written last by save_pretrained; the identity tells two saves of one step apart)."""
    identity = checkpoint_identity(ckpt_dir)
    try:
        source = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("source") or {}
    except (OSError, ValueError):
        return False
    return (identity is not None and source.get("checksums_sha256") == identity
            and source.get("checkpoint") == str(ckpt_dir.resolve()))


def read_train_state(ckpt_dir: Path) -> dict:
    if not (ckpt_dir / COMMIT_MARKER).exists():
        raise ExportError(f"{ckpt_dir}: not a committed checkpoint (no {COMMIT_MARKER}); "
                          "pass a run's checkpoints/step_N directory")
    verify_checksums(ckpt_dir)
    path = ckpt_dir / "train_state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable train state ({err})") from err


def model_config_of(ckpt_dir: Path, state: dict) -> ModelConfig:
    """The checkpoint's own record; checkpoints written before it existed: the run's config.yaml."""
    if "model" in state:
        where = f"{ckpt_dir / 'train_state.json'}: model"
        return ModelConfig.from_dict(accept_legacy_token_keys(state["model"], where), where=where)
    from celljepa_dist.config import load_config

    config_yaml = ckpt_dir.parent.parent / "config.yaml"
    if not config_yaml.is_file():
        raise ExportError(f"{ckpt_dir}: train_state.json has no model config and {config_yaml} is missing")
    return load_config(config_yaml).model


def student_state_dict(engine_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """fp32 weights of the engine's module from DeepSpeed's files (see the module docstring)."""
    tag_dir = engine_dir / ENGINE_TAG
    if not tag_dir.is_dir():
        raise ExportError(f"{engine_dir}: no DeepSpeed checkpoint tag {ENGINE_TAG!r}")
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"))
    if optim_files and "zero_stage" not in _optimizer_state(optim_files[0]):
        return bf16_optimizer_master_weights(tag_dir), "fp32 master weights (bf16 optimiser partitions)"
    if optim_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=ENGINE_TAG)
        return {k: v.float() for k, v in state.items()}, "fp32 master weights (zero_to_fp32)"
    module_file = tag_dir / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise ExportError(f"{tag_dir}: neither optimiser partitions nor {module_file.name}")
    saved = torch.load(module_file, map_location="cpu", weights_only=False)
    module = saved["module"]
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in module.values()})
    return {k: v.float() for k, v in module.items()}, f"module weights ({', '.join(dtypes)})"


def _optimizer_state(path: Path) -> dict:
    # mmap: only the few keys looked at are read from disk
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]


def _rank_of(path: Path) -> int:
    return int(path.name.split("_pp_rank_")[1].split("_")[0])


def bf16_optimizer_master_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """bf16 runs with ZeRO 0-2 use DeepSpeed's BF16_Optimizer, whose files zero_to_fp32 does not
    read (no zero_stage key). Its layout is ZeRO-1's: per parameter group, the params flattened in
    order (shapes in the model file's `param_shapes`), padded, cut into one equal slice per rank."""
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    files = sorted(tag_dir.glob("*_optim_states.pt"), key=_rank_of)
    if [_rank_of(f) for f in files] != list(range(len(files))):
        raise ExportError(f"{tag_dir}: bf16 optimiser partitions of ranks {[_rank_of(f) for f in files]}")
    partitions = [_optimizer_state(f)["single_partition_of_fp32_groups"] for f in files]
    out = {}
    for g, shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([p[g].reshape(-1).float() for p in partitions])
        offset = 0
        for name, shape in shapes.items():
            n = int(torch.Size(shape).numel())
            if offset + n > flat.numel():
                raise ExportError(f"{tag_dir}: group {g} holds {flat.numel()} values, {name} needs {offset + n}")
            out[name] = flat[offset:offset + n].view(shape).clone()
            offset += n
    return out


def consolidate_zero3(shards_per_rank: list[list[torch.Tensor]], template: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters from each rank's ZeRO-3 slices (parameter order of `template`)."""
    named = list(template.named_parameters())
    for rank, shards in enumerate(shards_per_rank):
        if len(shards) != len(named):
            raise ExportError(f"teacher shard of rank {rank}: {len(shards)} tensors for {len(named)} parameters")
    out = {}
    for i, (name, param) in enumerate(named):
        flat = torch.cat([shards[i].reshape(-1) for shards in shards_per_rank])
        if flat.numel() < param.numel():
            raise ExportError(f"teacher parameter {name}: {flat.numel()} values in the shards, needs {param.numel()}")
        out[name] = flat[: param.numel()].view(param.shape).clone()
    return out


def teacher_state_dict(teacher_dir: Path, template: torch.nn.Module, world_size: int) -> dict[str, torch.Tensor]:
    full = teacher_dir / "teacher.pt"
    if full.is_file():
        return torch.load(full, map_location="cpu", weights_only=True)["state_dict"]
    files = [teacher_dir / f"shard_rank{r:03d}.pt" for r in range(world_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{teacher_dir}: teacher files missing: {missing} (expected teacher.pt or "
                          f"{world_size} ZeRO-3 shards)")
    shards = [torch.load(f, map_location="cpu", weights_only=True)["shards"] for f in files]
    return consolidate_zero3(shards, template)


def _load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{what}: weights do not match the model config: missing {missing}, unexpected {unexpected}")


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, vocab_path: Optional[str | Path] = None) -> ExportResult:
    """Write `out_dir` (save_pretrained format: student + heads, EMA teacher, vocab, config)."""
    from celljepa_dist.data.vocab import GeneVocab

    ckpt_dir = Path(ckpt_dir)
    state = read_train_state(ckpt_dir)
    cfg = model_config_of(ckpt_dir, state)
    vocab_path = Path(vocab_path) if vocab_path else ckpt_dir.parent.parent / "vocab.json"
    if not vocab_path.is_file():
        raise ExportError(f"{ckpt_dir}: the run's vocab {vocab_path} is missing (pass --vocab)")
    vocab = GeneVocab.load(vocab_path)
    if state.get("vocab_sha256") and state["vocab_sha256"] != vocab.sha256:
        raise ExportError(f"{vocab_path}: vocab sha256 {vocab.sha256[:12]}... is not the checkpoint's "
                          f"{state['vocab_sha256'][:12]}...")
    if cfg.vocab_size is None:
        cfg = cfg.replace(vocab_size=len(vocab))

    student_state, student_weights = student_state_dict(ckpt_dir / "engine")
    model = CellJEPA(cfg)
    _load_strict(model, student_state, f"{ckpt_dir / 'engine'}")
    teacher = None
    if state.get("has_teacher"):
        teacher = CellEncoder(cfg)
        _load_strict(teacher, teacher_state_dict(ckpt_dir / "teacher", teacher, state["world_size"]),
                     f"{ckpt_dir / 'teacher'}")
    zero_stage = int(state.get("zero_stage", -1))
    source = {"checkpoint": str(ckpt_dir.resolve()), "step": state["step"], "objective": state.get("objective"),
              "zero_stage": zero_stage, "world_size": state["world_size"], "student_weights": student_weights,
              "checksums_sha256": checkpoint_identity(ckpt_dir)}
    save_pretrained(model, out_dir, vocab_path=vocab_path, teacher=teacher, data=state.get("data"), source=source)
    return ExportResult(Path(out_dir), state["step"], zero_stage, state["world_size"], teacher is not None,
                        student_weights)
