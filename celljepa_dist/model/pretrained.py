"""Weights for users: a directory with safetensors weights, the config as JSON and the vocab.

    model_dir/config.json          {"format", "model": ModelConfig, "has_teacher", "vocab_sha256",
                                    "data": {"n_bins", "max_genes", "binning_rule"} or null,
                                    "source": {...} or null (where the weights came from)}
    model_dir/model.safetensors    CellJEPA state dict (student + heads), fp32
    model_dir/teacher.safetensors  EMA teacher encoder (optional), fp32
    model_dir/vocab.json           the gene vocabulary the model was trained with (optional)

Loadable without DeepSpeed, whatever attention backend trained it (parameter names do not depend
on the backend). Every file is written to a temp name and renamed.

`vocab_sha256` is the `GeneVocab` content hash (the one shard manifests and the loader use), not
a hash of the file's bytes, so a model and a shard set can be checked against each other.
`data` records how the training cells were tokenised (bins, cell length), which embedding needs
to show new cells to the model the same way."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from celljepa_dist.atomic import atomic_path
from celljepa_dist.tokens import accept_legacy_token_keys

from .cell_jepa import CellJEPA
from .config import ModelConfig
from .encoder import CellEncoder


def _write_atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))

FORMAT = "celljepa-model/1"
CONFIG_FILE, MODEL_FILE, TEACHER_FILE, VOCAB_FILE = "config.json", "model.safetensors", "teacher.safetensors", "vocab.json"


def _fp32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}


def load_vocab(vocab_path: Path):
    """The GeneVocab of a vocab.json; any failure is a ValueError naming the file."""
    from celljepa_dist.data.vocab import GeneVocab

    try:
        return GeneVocab.load(vocab_path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{vocab_path}: not a celljepa vocab file ({err})") from err


DATA_KEYS = ("n_bins", "max_genes", "binning_rule")


def save_pretrained(model: CellJEPA, directory: str | os.PathLike, vocab_path: Optional[str | os.PathLike] = None,
                    teacher: Optional[CellEncoder] = None, data: Optional[dict] = None,
                    source: Optional[dict] = None) -> Path:
    """`data`: {"n_bins", "max_genes", "binning_rule"} of the training cells; `source`: free-form
    provenance (checkpoint, step, run) recorded as is."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if data is not None:
        missing = [k for k in DATA_KEYS if k not in data]
        if missing:
            raise ValueError(f"save_pretrained: data lacks {missing} (needs {list(DATA_KEYS)})")
        if data["n_bins"] != cfg.n_bins:
            raise ValueError(f"save_pretrained: data n_bins={data['n_bins']} but ModelConfig.n_bins={cfg.n_bins}")
    meta = {"format": FORMAT, "model": cfg.to_dict(), "has_teacher": teacher is not None, "vocab_sha256": None,
            "data": {k: data[k] for k in DATA_KEYS} if data is not None else None, "source": source}
    if vocab_path is not None:
        vocab_path = Path(vocab_path)
        vocab = load_vocab(vocab_path)
        if len(vocab) != cfg.vocab_size:
            raise ValueError(f"{vocab_path}: {len(vocab)} tokens but ModelConfig.vocab_size={cfg.vocab_size}")
        meta["vocab_sha256"] = vocab.sha256
        _write_atomic(directory / VOCAB_FILE, lambda tmp: shutil.copyfile(vocab_path, tmp))
    _write_atomic(directory / MODEL_FILE, lambda tmp: save_file(_fp32_state(model), tmp, metadata={"format": FORMAT}))
    if teacher is not None:
        _write_atomic(directory / TEACHER_FILE, lambda tmp: save_file(_fp32_state(teacher), tmp, metadata={"format": FORMAT}))
    # config.json last: a directory with a config is a complete one.
    _write_atomic(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2), encoding="utf-8"))
    return directory


def load_meta(directory: str | os.PathLike) -> dict:
    """The whole config.json of a save_pretrained directory (format checked)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a save_pretrained directory, or an unfinished save)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_config(directory: str | os.PathLike, **overrides) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    # config.json files written before celljepa_dist/tokens.py restate the token contract.
    cfg = ModelConfig.from_dict(accept_legacy_token_keys(load_meta(directory)["model"], str(path)), where=str(path))
    return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})


def _load_into(module: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing")
    state = load_file(str(path))
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path}: weights do not match the config: {err}") from err
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing}, unexpected {unexpected}")


def from_pretrained(directory: str | os.PathLike, attention_backend: Optional[str] = None,
                    flash_kernel: Optional[str] = None) -> CellJEPA:
    """The CellJEPA (student + heads) in fp32 on CPU; pick any backend for inference."""
    directory = Path(directory)
    model = CellJEPA(load_config(directory, attention_backend=attention_backend, flash_kernel=flash_kernel))
    _load_into(model, directory / MODEL_FILE)
    return model


def load_encoder(directory: str | os.PathLike, which: str = "teacher", attention_backend: Optional[str] = None) -> CellEncoder:
    """An encoder alone, for embedding cells: the EMA `teacher` (if saved) or the `student`."""
    directory = Path(directory)
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}: must be 'teacher' or 'student'")
    if which == "student":
        return from_pretrained(directory, attention_backend).student
    encoder = CellEncoder(load_config(directory, attention_backend=attention_backend))
    _load_into(encoder, directory / TEACHER_FILE)
    return encoder.eval()
