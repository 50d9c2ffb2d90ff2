import json

import numpy as np
import pytest

from celljepa_dist.data.vocab import GeneVocab, content_sha256


def small_vocab():
    return GeneVocab.from_genes(["ENSG00000000003", "ENSG00000000005", "ENSG00000000419", "ENSG00000000457"],
                                ["TSPAN6", "TNMD", "DPM1", "DPM1"])  # a duplicated symbol on purpose


def test_special_tokens_first_and_genes_in_file_order(tmp_path):
    v = small_vocab()
    v.save(tmp_path / "v.json")
    w = GeneVocab.load(tmp_path / "v.json")
    assert (w.pad_id, w.cls_id, w.eoc_id) == (0, 1, 2)
    assert len(w) == 3 + 4
    ids, missing = w.map_genes(["ENSG00000000419", "ENSG00000000003"])
    assert ids.tolist() == [5, 3] and missing == 0


def test_sha256_is_over_canonical_json_without_the_hash_field(tmp_path):
    v = small_vocab()
    v.save(tmp_path / "v.json")
    payload = json.loads((tmp_path / "v.json").read_text())
    body = {k: payload[k] for k in payload if k != "sha256"}
    import hashlib
    expect = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert payload["sha256"] == expect == v.sha256 == content_sha256(payload)
    # a different gene order is a different vocabulary
    other = GeneVocab.from_genes(list(reversed(v.feature_ids)), list(reversed(v.feature_names)))
    assert other.sha256 != v.sha256


def test_tampered_file_is_rejected(tmp_path):
    small_vocab().save(tmp_path / "v.json")
    payload = json.loads((tmp_path / "v.json").read_text())
    payload["genes"][0]["feature_id"] = "ENSG99999999999"
    (tmp_path / "v.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="sha256"):
        GeneVocab.load(tmp_path / "v.json")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        GeneVocab.load(tmp_path / "nope.json")


def test_duplicate_feature_id_is_an_error():
    with pytest.raises(ValueError, match="ENSG00000000003"):
        GeneVocab.from_genes(["ENSG00000000003", "ENSG00000000003"], ["A", "B"])


def test_map_by_id_then_unversioned_then_unique_name():
    v = small_vocab()
    ids, missing = v.map_genes(
        ["ENSG00000000005.7", "XYZ1", "XYZ2", "ENSG00000000003", "NOPE"],
        ["whatever", "TSPAN6", "DPM1", "TSPAN6", "NOPE"])
    # versioned id -> TNMD; XYZ1 by name TSPAN6 loses to the exact id match of row 3 (one token,
    # one dataset gene); DPM1 is ambiguous so never matched by name.
    assert ids.tolist() == [4, -1, -1, 3, -1]
    assert missing == 3
    assert np.unique(ids[ids >= 0]).size == (ids >= 0).sum()
