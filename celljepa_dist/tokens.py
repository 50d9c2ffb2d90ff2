"""The token and value contract: the one place special token ids and sentinel values are defined.

Everything that writes or reads tokens imports these names: the vocabulary (`data/vocab.py`,
special tokens first), shard validation (`data/shards.py`, no gene id below `N_SPECIAL`), the
batch builder (`data/collate.py`), synthetic batches (`model/synthetic.py`), the model's
embeddings (`model/embedding.py`) and zero-shot embedding (`zero_shot/`, through collate).

Token ids (docs/ARCHITECTURE.md, "Vocabulary"): the special tokens come first, in this order, so
`<pad>` = 0, `<cls>` = 1, `<eoc>` = 2, and genes start at `N_SPECIAL`.

Values (docs/ARCHITECTURE.md, "Batches"): bins are >= 0 (0 only at `<cls>`), so the sentinels
are negative: `MASK_VALUE` where a value is masked, `PAD_VALUE` in padding.

Model configs written before this module existed carry the ids and values as four fields
(`pad_id`, `cls_id`, `mask_value`, `pad_value`); they are no longer settable.
`accept_legacy_token_keys` reads such a mapping: the keys are accepted when they equal the
contract and dropped, and a different value is an error naming the file and the key.
"""
from __future__ import annotations

from typing import Any, Mapping

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>", "<eoc>")
PAD_TOKEN, CLS_TOKEN, EOC_TOKEN = SPECIAL_TOKENS
PAD_ID: int = SPECIAL_TOKENS.index(PAD_TOKEN)
CLS_ID: int = SPECIAL_TOKENS.index(CLS_TOKEN)
EOC_ID: int = SPECIAL_TOKENS.index(EOC_TOKEN)
N_SPECIAL: int = len(SPECIAL_TOKENS)  # the first gene's token id

MASK_VALUE: float = -1.0  # model input where the value is masked
PAD_VALUE: float = -2.0  # input and target in padding
CLS_VALUE: float = 0.0  # input and target at <cls>

# The ModelConfig fields that used to restate the contract, with the only values they could hold.
LEGACY_MODEL_KEYS: dict[str, Any] = {"pad_id": PAD_ID, "cls_id": CLS_ID, "mask_value": MASK_VALUE,
                                     "pad_value": PAD_VALUE}


def accept_legacy_token_keys(model: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`model` (a ModelConfig mapping, maybe from an older file) without the legacy token keys.

    Each legacy key present must equal the contract (ints and floats compare by value, so YAML's
    `-1` and `-1.0` both pass; booleans and strings do not); otherwise ValueError naming `where`
    and the key. Returns a new dict; `model` is not changed. A non-mapping is returned as is, for
    the config mapper to reject with its own message."""
    if not isinstance(model, Mapping):
        return model
    for key, want in LEGACY_MODEL_KEYS.items():
        if key in model:
            got = model[key]
            if isinstance(got, bool) or not isinstance(got, (int, float)) or got != want:
                raise ValueError(
                    f"{where}: {key}={got!r} differs from the token contract ({key}={want!r}, "
                    f"celljepa_dist/tokens.py); the key is no longer settable: remove it")
    return {k: v for k, v in model.items() if k not in LEGACY_MODEL_KEYS}
