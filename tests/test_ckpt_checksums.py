"""Checksums of checkpoints (train/checksums.py) and what uses them: --resume auto's fallback to
the newest intact commit, the refusal of a named corrupt one, the export's check; with them the
pure pieces of the other checkpoint faults: the step plan's warning, the refusal of a weight-shape
change on resume, and MLflow failing after the error that stopped a run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from celljepa_dist.export import ExportError, export_checkpoint
from celljepa_dist.train.checkpoint import COMMIT_MARKER, ResumeError, resolve_verified_resume
from celljepa_dist.train.checksums import (
    CHECKSUMS_FILE,
    checkpoint_files,
    file_digest,
    merge_shares,
    owner_of,
    record_share,
    verify_share,
)
from celljepa_dist.train.state import planned_total_steps, shape_change_refusal

# A 2-rank ZeRO-1 checkpoint's layout (names as DeepSpeed and CheckpointManager write them).
FILES = {"engine/engine/mp_rank_00_model_states.pt": 0, "engine/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
         "engine/engine/zero_pp_rank_1_mp_rank_00_optim_states.pt": 1, "teacher/teacher.pt": 0,
         "rank_0.pt": 0, "rank_1.pt": 1, "train_state.json": 0}


def _fake_checkpoint(d: Path, world_size: int = 2, commit: bool = True) -> Path:
    """Files of distinct content, hashed by each rank as CheckpointManager.save does, committed."""
    for i, rel in enumerate(FILES):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"i": i, "x": torch.arange(100 + i)}, d / rel)
    for rank in range(world_size):
        record_share(d, rank, world_size)
    merge_shares(d, world_size)
    if commit:
        (d / COMMIT_MARKER).write_text("{}")
    return d


def test_each_rank_hashes_its_own_files_and_the_manifest_covers_all(tmp_path):
    assert {rel: owner_of(rel, 2) for rel in FILES} == FILES
    assert owner_of("teacher/shard_rank003.pt", 4) == 3 and owner_of("rank_5.pt", 4) == 1
    d = _fake_checkpoint(tmp_path / "step_00000006")
    manifest = json.loads((d / CHECKSUMS_FILE).read_text())
    assert sorted(manifest["files"]) == sorted(FILES) == checkpoint_files(d)  # no share files left
    for rel, entry in manifest["files"].items():  # against an independent hash of each file
        data = (d / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert verify_share(d, 0, 2) == [] and verify_share(d, 1, 2) == [] and verify_share(d) == []


def test_verification_names_the_missing_truncated_or_garbled_file(tmp_path):
    d = _fake_checkpoint(tmp_path / "step_00000006")
    engine = d / "engine/engine/mp_rank_00_model_states.pt"
    engine.write_bytes(engine.read_bytes()[:50])
    garbled = bytearray((d / "rank_1.pt").read_bytes())
    garbled[-40] ^= 0xFF
    (d / "rank_1.pt").write_bytes(bytes(garbled))
    (d / "teacher/teacher.pt").unlink()
    problems = verify_share(d)
    assert len(problems) == 3
    assert any(p.startswith("engine/engine/mp_rank_00_model_states.pt: size mismatch (expected ") and
               "found 50" in p for p in problems)
    expected = json.loads((d / CHECKSUMS_FILE).read_text())["files"]["rank_1.pt"]["sha256"]
    assert (f"rank_1.pt: checksum mismatch (expected sha256 {expected[:16]}..., found "
            f"{file_digest(d / 'rank_1.pt')[:16]}...)") in problems
    assert "teacher/teacher.pt: missing" in problems
    assert verify_share(d, 1, 2) == [p for p in problems if p.startswith("rank_1.pt")]  # rank 1's share


def test_resume_auto_falls_back_past_corrupt_commits_and_a_named_one_is_refused(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    old = _fake_checkpoint(root / "step_00000003")
    mid = _fake_checkpoint(root / "step_00000006")
    new = _fake_checkpoint(root / "step_00000009")
    _fake_checkpoint(root / "step_00000012", commit=False)  # uncommitted: never considered
    (new / "rank_0.pt").write_bytes(b"garbage")
    (mid / "train_state.json").unlink()
    assert resolve_verified_resume(root, "auto") == old
    out = capsys.readouterr().out
    assert "WARNING: checkpoint step_00000009: rank_0.pt: size mismatch" in out
    assert "WARNING: checkpoint step_00000006: train_state.json: missing" in out
    assert out.index("step_00000009") < out.index("step_00000006")  # newest first
    with pytest.raises(ResumeError, match=r"checkpoint step_00000009: rank_0.pt: size mismatch.*corrupt"):
        resolve_verified_resume(root, str(new))
    assert resolve_verified_resume(root, str(old)) == old and resolve_verified_resume(root, "none") is None
    (old / "rank_1.pt").write_bytes(b"")
    with pytest.raises(ResumeError, match="no intact committed checkpoint.*step_00000003: rank_1.pt"):
        resolve_verified_resume(root, "auto")


def test_checkpoints_without_checksums_resume_with_a_note(tmp_path, capsys):
    d = _fake_checkpoint(tmp_path / "checkpoints" / "step_00000004")
    (d / CHECKSUMS_FILE).unlink()
    assert verify_share(d) is None
    assert resolve_verified_resume(d.parent, "auto") == d
    assert "has no checksums" in capsys.readouterr().out


def test_export_refuses_a_corrupt_checkpoint_naming_the_file(tmp_path):
    d = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004")
    (d / "train_state.json").write_text(json.dumps({"step": 4, "world_size": 2, "model": {"vocab_size": 40}}))
    with pytest.raises(ExportError, match=r"step_00000004: corrupt: train_state.json: size mismatch"):
        export_checkpoint(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_max_steps_beyond_the_epochs_warns():
    assert planned_total_steps(19, 2, 0) == (38, None)
    assert planned_total_steps(19, 2, 10) == (10, None) and planned_total_steps(19, 2, 38) == (38, None)
    total, warning = planned_total_steps(19, 2, 100)
    assert total == 38 and warning.startswith("max_steps=100 but epochs=2 allow only 38 steps")
    assert "the run stops at 38" in warning


def _fingerprint(**model):
    base = {"model.vocab_size": 43, "model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2, "model.d_hid": 16,
            "model.dropout": 0.1, "objective": "celljepa"}
    return {**base, **{f"model.{k}": v for k, v in model.items()}}


def test_a_weight_shape_change_is_refused_naming_the_keys():
    assert shape_change_refusal(_fingerprint(), _fingerprint(dropout=0.3)) is None  # allowed with the flag
    assert shape_change_refusal(_fingerprint(), {**_fingerprint(), "objective": "scgpt"}) is None
    refusal = shape_change_refusal(_fingerprint(), _fingerprint(d_model=32, dropout=0.3))
    assert "model.d_model: checkpoint 16, now 32" in refusal and "dropout" not in refusal
    assert "--allow-config-change included" in refusal
    refusal = shape_change_refusal(_fingerprint(), _fingerprint(n_layers=2, vocab_size=50))
    assert "model.n_layers: checkpoint 1, now 2" in refusal and "model.vocab_size: checkpoint 43, now 50" in refusal


def test_mlflow_failing_after_the_error_is_a_warning(tmp_path, capsys):
    """The real MLflow store refuses to terminate a deleted run; the error that stopped the run is
    the one raised, and the warning names it first."""
    from celljepa_dist.config import TrackingConfig
    from celljepa_dist.tracking import MlflowTracker, finish_failed

    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path / "run", {}, False)
    tracker.client.delete_run(tracker.run_id)
    with pytest.raises(OSError, match="No space left"):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            finish_failed(tracker)
            raise
    err = capsys.readouterr().err
    assert ("WARNING: the run stopped on OSError: [Errno 28] No space left on device. Marking its "
            "MLflow run FAILED then failed too (MlflowException") in err
