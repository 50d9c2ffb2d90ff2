"""TrainConfig: YAML -> typed dataclasses, overrides, validation, DeepSpeed JSON, LR schedule."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from celljepa_dist.config import ConfigError, TrainConfig, flatten, load_config, save_config
from celljepa_dist.train.engine import build_ds_config, lr_factor

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, data) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_nested_key_names_dotted_key_and_valid_keys(tmp_path):
    path = _write(tmp_path, {"data": {"shards_dir": "x"}, "optim": {"lr": 1e-4, "learning_rate": 3}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "weight_decay" in msg and str(path) in msg


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError, match=r"deepspeed.*'zero'.*zero_stage"):
        load_config(None, ["data.shards_dir=x", "deepspeed.zero=2"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["data.shards_dir=x", "epochs.x=2"])


def test_overrides_are_coerced_by_field_type():
    cfg = load_config(None, ["data.shards_dir=s", "optim.lr=3e-4", "deepspeed.zero_stage=3", "deterministic=true",
                             "optim.betas=[0.8, 0.95]", "model.vocab_size=100", "data.vocab_path=null",
                             "objective=scgpt", "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.deepspeed.zero_stage == 3 and isinstance(cfg.deepspeed.zero_stage, int)
    assert cfg.deterministic is True
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.model.vocab_size == 100 and cfg.data.vocab_path is None
    assert cfg.objective == "scgpt" and cfg.loss.objective == "scgpt"  # the loss section follows
    assert cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": True}}


@pytest.mark.parametrize("override, field", [
    ("deepspeed.zero_stage=two", "deepspeed.zero_stage"),
    ("deepspeed.zero_stage=1.5", "deepspeed.zero_stage"),
    ("objective=byol", "objective"),
    ("deepspeed.precision=fp8", "deepspeed.precision"),
    ("deterministic=maybe", "deterministic"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["data.shards_dir=s", override])


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=0", "optim.lr"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("model.n_heads=5", "n_heads"),  # validated by the model library's own ModelConfig
    ("data.mask_ratio=1.5", "mask_ratio"),  # ... and by the loader's LoaderConfig
    ("epochs=0", "epochs"),
])
def test_validation_names_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["data.shards_dir=s", override])


def test_skip_policy_needs_zero_and_loss_objective_is_not_settable():
    with pytest.raises(ConfigError, match="nonfinite_policy=skip needs deepspeed.zero_stage"):
        load_config(None, ["data.shards_dir=s", "nonfinite_policy=skip", "deepspeed.zero_stage=0"])
    with pytest.raises(ConfigError, match="top-level `objective`"):
        load_config(None, ["data.shards_dir=s", "loss.objective=scgpt"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["optim.lr=5e-4", "deepspeed.zero_stage=2"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    flat = flatten(cfg)
    assert flat["optim.lr"] == 5e-4 and flat["deepspeed.zero_stage"] == 2 and flat["model.d_model"] == 64
    assert all(not isinstance(v, dict) or not v for v in flat.values())


def test_kidney_config_is_the_paper_recipe():
    cfg = load_config(REPO / "configs" / "pretrain_kidney.yaml")
    m = cfg.model
    assert (m.n_layers, m.d_model, m.n_heads, m.d_hid, m.dropout) == (12, 512, 8, 512, 0.2)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.lr_decay_per_epoch) == (1e-4, 2e-4, 0.9)
    assert (cfg.data.batch_size, cfg.data.mask_ratio, cfg.epochs) == (32, 0.15, 4)
    assert (cfg.loss.w_rec, cfg.loss.w_jepa, cfg.objective) == (1.0, 1000.0, "celljepa")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_json_is_accepted_by_deepspeed(stage, precision):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(None, ["data.shards_dir=s", "data.batch_size=6", f"deepspeed.zero_stage={stage}",
                             f"deepspeed.precision={precision}", "deepspeed.gradient_accumulation_steps=3",
                             "optim.grad_clip=0.5", "optim.lr=2e-4"])
    ds = build_ds_config(cfg, world_size=1, on_cuda=False)
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own parser and batch arithmetic checks
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.train_micro_batch_size_per_gpu == 6 and parsed.gradient_accumulation_steps == 3
    assert parsed.train_batch_size == 18 and parsed.gradient_clipping == 0.5
    assert parsed.optimizer_name == "adamw" and parsed.optimizer_params["lr"] == 2e-4
    assert build_ds_config(cfg, world_size=4, on_cuda=True)["train_batch_size"] == 72


def test_extra_deepspeed_keys_merge_last():
    cfg = load_config(None, ["data.shards_dir=s", "deepspeed.zero_stage=2",
                             "deepspeed.extra={zero_optimization: {overlap_comm: true}, steps_per_print: 7}"])
    ds = build_ds_config(cfg, 1, on_cuda=False)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["steps_per_print"] == 7


def test_lr_decays_by_0_9_per_epoch_as_a_step_function():
    steps_per_epoch = 7
    for step in range(40):
        naive = 1.0
        for _ in range(step // steps_per_epoch):  # one multiplication per finished epoch
            naive *= 0.9
        assert lr_factor(step, steps_per_epoch, 0.9, 0) == pytest.approx(naive, rel=1e-12)
    assert lr_factor(0, 10, 0.9, 4) == pytest.approx(0.25) and lr_factor(3, 10, 0.9, 4) == 1.0


def test_defaults_need_only_the_shards_dir():
    with pytest.raises(ConfigError, match="shards_dir"):
        load_config(None)
    assert isinstance(load_config(None, ["data.shards_dir=x"]), TrainConfig)
