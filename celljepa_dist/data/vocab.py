"""Gene vocabulary keyed by Ensembl feature_id, with special tokens and a content hash.

File format (docs/ARCHITECTURE.md): {"format": "celljepa-vocab/1", "special_tokens": [...],
"genes": [{"feature_id", "feature_name"}, ...], "sha256": hex}. Token ids: special tokens first
(they must start with celljepa_dist/tokens.py's SPECIAL_TOKENS, so their ids are the contract's),
then genes in file order. The hash covers the canonical JSON of everything except "sha256", so
shards and checkpoints can refuse a vocabulary they were not built with.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from celljepa_dist.atomic import atomic_write_bytes, read_json
from celljepa_dist.tokens import CLS_ID, EOC_ID, N_SPECIAL, PAD_ID, SPECIAL_TOKENS

VOCAB_FORMAT = "celljepa-vocab/1"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_sha256(payload: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in payload.items() if k != "sha256"})).hexdigest()


def _strip_version(feature_id: str) -> str:
    # GENCODE-style ids carry a version suffix (ENSG00000000003.15); the Census does not.
    return feature_id.split(".", 1)[0] if feature_id.startswith("ENS") else feature_id


@dataclass
class GeneVocab:
    feature_ids: list[str]
    feature_names: list[str]
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS
    _id_index: dict = field(default_factory=dict, repr=False)
    _name_index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if len(self.feature_ids) != len(self.feature_names):
            raise ValueError(
                f"vocab: {len(self.feature_ids)} feature_ids but {len(self.feature_names)} feature_names")
        if tuple(self.special_tokens[:N_SPECIAL]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab: special_tokens must start with {SPECIAL_TOKENS}, got {self.special_tokens}")
        offset = len(self.special_tokens)
        self._id_index = {}
        for i, fid in enumerate(self.feature_ids):
            if not fid:
                raise ValueError(f"vocab: gene #{i} ({self.feature_names[i]!r}) has an empty feature_id")
            if fid in self._id_index:
                raise ValueError(f"vocab: duplicate feature_id {fid!r} (genes #{self._id_index[fid] - offset} and #{i})")
            self._id_index[fid] = i + offset
        # Names are only a fallback, and only when unambiguous (symbols are not unique in Ensembl).
        counts: dict[str, int] = {}
        for name in self.feature_names:
            counts[name] = counts.get(name, 0) + 1
        self._name_index = {n: i + offset for i, n in enumerate(self.feature_names) if n and counts[n] == 1}
        self._unversioned = {}
        for fid, tok in self._id_index.items():
            self._unversioned.setdefault(_strip_version(fid), tok)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_genes(cls, feature_ids: Iterable[str], feature_names: Iterable[str]) -> "GeneVocab":
        return cls([str(f) for f in feature_ids], [str(n) for n in feature_names])

    def to_dict(self) -> dict:
        payload = {
            "format": VOCAB_FORMAT,
            "special_tokens": list(self.special_tokens),
            "genes": [{"feature_id": f, "feature_name": n} for f, n in zip(self.feature_ids, self.feature_names)],
        }
        payload["sha256"] = content_sha256(payload)
        return payload

    def save(self, path: str | os.PathLike) -> str:
        payload = self.to_dict()
        atomic_write_bytes(path, json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8"))
        return payload["sha256"]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GeneVocab":
        path = Path(path)
        payload = read_json(path, "vocab file")
        for key in ("format", "special_tokens", "genes", "sha256"):
            if key not in payload:
                raise ValueError(f"vocab file {path} lacks the key {key!r}")
        if payload["format"] != VOCAB_FORMAT:
            raise ValueError(f"vocab file {path}: unknown format {payload['format']!r}, expected {VOCAB_FORMAT!r}")
        if content_sha256(payload) != payload["sha256"]:
            raise ValueError(f"vocab file {path}: content does not match its sha256 (edited or corrupt)")
        genes = payload["genes"]
        return cls([g["feature_id"] for g in genes], [g.get("feature_name", "") for g in genes],
                   tuple(payload["special_tokens"]))

    # --- lookups --------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        if not hasattr(self, "_sha256"):
            self._sha256 = self.to_dict()["sha256"]
        return self._sha256

    def __len__(self) -> int:
        return len(self.special_tokens) + len(self.feature_ids)

    # The special tokens start with tokens.SPECIAL_TOKENS (checked above): their ids are the contract's.
    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def cls_id(self) -> int:
        return CLS_ID

    @property
    def eoc_id(self) -> int:
        return EOC_ID

    def map_genes(self, feature_ids: Sequence[str],
                  feature_names: Sequence[str] | None = None) -> tuple[np.ndarray, int]:
        """Token id per dataset gene (-1 if unmatched) and the number unmatched.

        Matching by exact feature_id first, then by unversioned Ensembl id, then by unique name.
        A token is given to at most one dataset gene (the earlier pass, then the earlier gene), so
        a cell never holds the same token twice.
        """
        ids = np.full(len(feature_ids), -1, dtype=np.int64)
        used: set[int] = set()
        lookups = [lambda i: self._id_index.get(str(feature_ids[i])),
                   lambda i: self._unversioned.get(_strip_version(str(feature_ids[i])))]
        if feature_names is not None:
            lookups.append(lambda i: self._name_index.get(str(feature_names[i])))
        for lookup in lookups:
            for i in np.flatnonzero(ids < 0):
                tok = lookup(i)
                if tok is not None and tok not in used:
                    ids[i] = tok
                    used.add(tok)
        return ids, int((ids < 0).sum())
