"""The pre-trained starting point of a finetuning run (`init`, a save_pretrained directory): its
checks, its weights and what it says about the pre-training run it came from.

    init = read_init(cfg.init, cfg.objective, cfg.vocab)     # checks first, no weights read
    fresh = load_student_weights(model, init)                # student + heads (+ a fresh GEPC head)
    load_teacher_weights(teacher_encoder, init)              # the EMA teacher, celljepa only
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from celljepa_dist.model.config import ModelConfig

GEPC_PREFIX = "mvc_head."  # the GEPC head's parameters in a CellJEPA state dict


@dataclass
class InitModel:
    directory: Path
    meta: dict  # config.json
    model: ModelConfig
    vocab: object  # GeneVocab
    vocab_path: Path
    has_teacher: bool
    n_bins: int
    max_genes: int
    binning_rule: str

    @property
    def source(self) -> dict:
        return dict(self.meta.get("source") or {})


def read_init(init: str | Path, objective: str, vocab: str = "") -> InitModel:
    """The init directory, checked: a complete save_pretrained dir with its own vocab (matching its
    config.json hash, and the config's `vocab` when one is set), and an EMA teacher when the
    objective is celljepa (its JEPA term needs one)."""
    from celljepa_dist.data.binning import BINNING_RULE
    from celljepa_dist.data.vocab import GeneVocab
    from celljepa_dist.model.pretrained import TEACHER_FILE, VOCAB_FILE, load_config, load_meta
    from celljepa_dist.zero_shot.embed import load_model_vocab, training_tokenisation

    directory = Path(init)
    if not directory.is_dir():
        raise FileNotFoundError(f"init: {directory} is not a directory (a save_pretrained model dir, e.g. RUN_DIR/model "
                                "of a pre-training run)")
    meta = load_meta(directory)
    model = load_config(directory)
    where = str(directory)
    vocab_obj = load_model_vocab(directory, meta, model.require_vocab_size())
    if vocab:
        other = GeneVocab.load(vocab)
        if other.sha256 != vocab_obj.sha256:
            raise ValueError(f"init {directory} was pre-trained with vocab sha256 {vocab_obj.sha256[:12]}... "
                             f"({directory / VOCAB_FILE}, {len(vocab_obj)} tokens) but vocab: {vocab} has sha256 "
                             f"{other.sha256[:12]}... ({len(other)} tokens): a finetuned model keeps its pre-trained "
                             "vocabulary (leave `vocab` unset; h5ad genes are mapped to the init's vocab)")
    has_teacher = bool(meta.get("has_teacher")) and (directory / TEACHER_FILE).is_file()
    if objective == "celljepa" and not has_teacher:
        raise ValueError(f"init {directory} has no EMA teacher (has_teacher={meta.get('has_teacher')}, "
                         f"{TEACHER_FILE} {'present' if (directory / TEACHER_FILE).is_file() else 'missing'}; pre-trained "
                         f"with objective {(meta.get('source') or {}).get('objective')!r}?): objective "
                         "celljepa keeps the JEPA term and needs the pre-trained teacher. Finetune it with "
                         "objective=scgpt, or start from a celljepa pre-training run")
    n_bins, max_genes = training_tokenisation(meta, model.n_bins, where)
    return InitModel(directory, meta, model, vocab_obj, directory / VOCAB_FILE, has_teacher, n_bins, max_genes,
                     BINNING_RULE)


def load_student_weights(model: torch.nn.Module, init: InitModel) -> list[str]:
    """The init's student and heads into `model` (a CellJEPA of the finetuned config). Every
    parameter must come from the init except a GEPC head the init does not have (celljepa
    pre-trains without GEPC): that one keeps its fresh initialisation. Returns the fresh keys."""
    from safetensors.torch import load_file

    from celljepa_dist.model.pretrained import MODEL_FILE

    path = init.directory / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing")
    state = load_file(str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the finetuned model: {err}") from err
    fresh = [k for k in missing if k.startswith(GEPC_PREFIX) and not init.model.use_mvc]
    wrong = [k for k in missing if k not in fresh]
    if wrong or unexpected:
        raise ValueError(f"{path}: weights do not match the finetuned model: missing {wrong}, unexpected {unexpected}")
    return fresh


def load_teacher_weights(encoder: torch.nn.Module, init: InitModel) -> None:
    from celljepa_dist.model.pretrained import TEACHER_FILE, _load_into

    _load_into(encoder, init.directory / TEACHER_FILE)


def _source_run_dir(init: InitModel) -> list[Path]:
    """Where the pre-training run's files may be: the run dir of the exported checkpoint, and
    the init's parent (RUN_DIR/model -> RUN_DIR)."""
    dirs = []
    checkpoint = init.source.get("checkpoint")
    if checkpoint:
        dirs.append(Path(checkpoint).parents[1])
    dirs.append(init.directory.resolve().parent)
    return list(dict.fromkeys(dirs))


def pretrain_w_jepa(init: InitModel) -> Optional[float]:
    """The JEPA weight the init was pre-trained with: the exported checkpoint's fingerprint, else
    the run's config.yaml; None when neither is there."""
    import yaml

    checkpoint = init.source.get("checkpoint")
    if checkpoint and (Path(checkpoint) / "train_state.json").is_file():
        fingerprint = json.loads((Path(checkpoint) / "train_state.json").read_text()).get("fingerprint") or {}
        if "loss.w_jepa" in fingerprint:
            return float(fingerprint["loss.w_jepa"])
    for run_dir in _source_run_dir(init):
        config = run_dir / "config.yaml"
        if config.is_file():
            loss = (yaml.safe_load(config.read_text()) or {}).get("loss") or {}
            if "w_jepa" in loss:
                return float(loss["w_jepa"])
    return None


def parent_run(init: InitModel) -> Optional[dict]:
    """The pre-training run's MLflow id and store ({"run_id", "tracking_uri"}), when its run dir
    still holds mlflow_run.json."""
    from celljepa_dist.tracking import RUN_ID_FILE

    for run_dir in _source_run_dir(init):
        path = run_dir / RUN_ID_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            return {"run_id": saved["run_id"], "tracking_uri": saved.get("tracking_uri", "")}
    return None
