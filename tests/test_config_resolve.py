"""Values resolved once: data.seed from seed (load), vocab size / GEPC head / n_bins (resolve_for_run),
and the 1-rank MASTER_PORT from launching.free_port."""
from __future__ import annotations

import copy
import itertools
import os
import sys
import types
from pathlib import Path

import pytest

from celljepa_dist.config import ConfigError, load_config, resolve_for_run, save_config

REPO = Path(__file__).resolve().parents[1]


def _old_setup_edits(cfg, vocab_size):
    """Reference: the in-place edits train/loop.py made at setup before resolve_for_run."""
    cfg = copy.deepcopy(cfg)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab_size
    if cfg.loss.gepc_weight > 0:
        cfg.model.use_mvc = True
    cfg.model.validate()
    return cfg


@pytest.mark.parametrize("objective, w_mvc, vocab, use_mvc", itertools.product(
    ["celljepa", "scgpt"], [None, "0", "0.5"], [None, "120"], ["false", "true"]))
def test_resolve_for_run_matches_the_old_setup_edits(objective, w_mvc, vocab, use_mvc):
    overrides = ["data.shards_dir=s", f"objective={objective}", f"model.use_mvc={use_mvc}"]
    overrides += [f"loss.w_mvc={w_mvc}"] * (w_mvc is not None) + [f"model.vocab_size={vocab}"] * (vocab is not None)
    cfg = load_config(None, overrides)
    before = copy.deepcopy(cfg)
    resolved = resolve_for_run(cfg, vocab_size=97, manifest_n_bins=51)
    assert resolved == _old_setup_edits(cfg, 97)
    assert cfg == before  # a new config; the input is untouched
    assert resolved.model is not cfg.model and resolved.optim is not cfg.optim and resolved.data is not cfg.data


def test_resolve_for_run_values():
    cfg = load_config(None, ["data.shards_dir=s", "objective=scgpt"])
    r = resolve_for_run(cfg, vocab_size=50, manifest_n_bins=51)
    assert (r.model.vocab_size, r.model.use_mvc) == (50, True)  # scgpt: GEP + GEPC, so the head exists
    assert (cfg.model.vocab_size, cfg.model.use_mvc) == (None, False)
    r = resolve_for_run(load_config(None, ["data.shards_dir=s"]), vocab_size=50, manifest_n_bins=51)
    assert (r.model.vocab_size, r.model.use_mvc) == (50, False)  # celljepa: no GEPC by default


def test_resolve_for_run_errors_name_the_key():
    cfg = load_config(None, ["data.shards_dir=s", "model.vocab_size=40"])
    with pytest.raises(ConfigError, match=r"model\.vocab_size=40: smaller than the vocab \(50 tokens\)"):
        resolve_for_run(cfg, vocab_size=50, manifest_n_bins=51)
    with pytest.raises(ConfigError, match=r"model\.n_bins=51: the shards are binned with n_bins=21"):
        resolve_for_run(load_config(None, ["data.shards_dir=s"]), vocab_size=50, manifest_n_bins=21)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=2"):
        resolve_for_run(load_config(None, ["data.shards_dir=s"]), vocab_size=2, manifest_n_bins=51)


def test_resolved_config_yaml_reloads_to_the_same_config(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["objective=scgpt", "seed=4"])
    resolved = resolve_for_run(cfg, vocab_size=123, manifest_n_bins=51)
    save_config(resolved, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == resolved
    assert load_config(tmp_path / "config.yaml", ["checkpoint.resume=auto"]).data.seed == 4


# --- one seed story ---------------------------------------------------------------------------------

def test_data_seed_follows_seed_unless_set():
    assert load_config(None, ["data.shards_dir=s"]).data.seed == 0
    assert load_config(None, ["data.shards_dir=s", "seed=1"]).data.seed == 1
    assert load_config(None, ["data.shards_dir=s", "seed=1", "data.seed=5"]).data.seed == 5
    assert load_config(None, ["data.shards_dir=s", "data.seed=5"]).seed == 0


def test_changing_seed_changes_the_data_order(tiny_shards):
    from celljepa_dist.data.stream import LoaderConfig, build_loader

    shards_dir, _ = tiny_shards
    base = [f"data.shards_dir={shards_dir}", "data.batch_size=8", "data.max_genes=40", "data.num_workers=0"]

    def order(loader_cfg):
        loader, n = build_loader(loader_cfg, 0, 1, 0)
        return [c for batch in itertools.islice(loader, 4) for c in batch["cell_ids"].tolist()]

    seed0 = order(load_config(None, base).data)
    seed1 = order(load_config(None, [*base, "seed=1"]).data)
    assert seed0 != seed1
    # Reference: the loader configured directly with that seed.
    direct = LoaderConfig(shards_dir=str(shards_dir), batch_size=8, max_genes=40, num_workers=0, seed=1)
    assert seed1 == order(direct)
    assert order(load_config(None, [*base, "seed=1", "data.seed=0"]).data) == seed0  # explicit data.seed wins


# --- MASTER_PORT of a plain 1-rank run ------------------------------------------------------------

def test_one_rank_run_takes_a_free_port(monkeypatch):
    import celljepa_dist.train.engine as engine

    calls = []
    fake_ds = types.SimpleNamespace(init_distributed=lambda dist_backend, timeout: calls.append(dist_backend))
    monkeypatch.setitem(sys.modules, "deepspeed", fake_ds)
    monkeypatch.setattr(engine, "free_port", lambda: 45678)
    monkeypatch.setattr(engine, "unlink_shm_allreduce_buffer", lambda rank: None)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(None, ["data.shards_dir=s", "deepspeed.backend=gloo", "deepspeed.threads_per_rank=0"])
    info = engine.init_distributed(cfg)
    assert (info.rank, info.world_size, calls) == (0, 1, ["gloo"])
    assert os.environ["MASTER_PORT"] == "45678"
    monkeypatch.setenv("MASTER_PORT", "31234")  # a launcher's port is kept
    engine.init_distributed(cfg)
    assert os.environ["MASTER_PORT"] == "31234"
