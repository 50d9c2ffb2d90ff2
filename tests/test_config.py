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


# --- one mechanism: typed_config, Literal enums, dotted-key errors, pure validation ----------------

ENUM_KEYS = {  # every enumeration of the run config, as a Literal type
    "objective", "nonfinite_policy", "model.norm_style", "model.attention_backend", "model.flash_kernel",
    "model.value_encoder", "loss.objective", "loss.ecs_style", "ema.schedule", "data.on_error",
    "deepspeed.precision", "deepspeed.backend",
}


def _leaf_fields(cls, prefix=""):
    """dotted key -> type of every non-section field, walked with dataclasses (not typed_config)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_leaf_fields(hints[f.name], key + "."))
        else:
            out[key] = hints[f.name]
    return out


def test_enums_are_literal_types_and_reject_other_values_by_dotted_key():
    import typing

    literal = {k for k, tp in _leaf_fields(TrainConfig).items() if typing.get_origin(tp) is typing.Literal}
    assert literal == ENUM_KEYS
    for key in sorted(ENUM_KEYS - {"loss.objective"}):  # loss.objective follows objective
        with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: 'bogus' is not one of"):
            load_config(None, ["data.shards_dir=s", f"{key}=bogus"])


@pytest.mark.parametrize("override, key", [
    ("model.n_heads=5", "model.n_heads=5"), ("model.norm_style=pre", None), ("data.batch_size=0", "data.batch_size=0"),
    ("data.mask_ratio=1.5", "data.mask_ratio=1.5"), ("ema.base=1.5", "ema.base=1.5"),
    ("loss.w_jepa=-1", "loss.w_jepa=-1.0"), ("optim.lr=0", "optim.lr=0.0"),
    ("tracking.health_thresholds.max_mean_cos=2", "tracking.health_thresholds.max_mean_cos"),
    ("tracking.probe_cells=1", "tracking.probe_cells=1"),
    ("deepspeed.threads_per_rank=-1", "deepspeed.threads_per_rank=-1"),
])
def test_section_validation_names_the_dotted_key_under_the_run_config(override, key):
    if key is None:
        load_config(None, ["data.shards_dir=s", override])
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.shards_dir=s", override])
    assert str(e.value).startswith(key), str(e.value)


def test_sections_validated_alone_keep_their_class_names():
    from celljepa_dist.data.stream import LoaderConfig
    from celljepa_dist.model.config import LossConfig, ModelConfig
    from celljepa_dist.model.ema import EMAConfig

    for bad, name in [(ModelConfig(norm_style="sandwich"), "ModelConfig.norm_style='sandwich'"),
                      (LossConfig(ecs_style="x"), "LossConfig.ecs_style='x'"),
                      (EMAConfig(schedule="exp"), "EMAConfig.schedule='exp'"),
                      (LoaderConfig(shards_dir="s", on_error="ignore"), "LoaderConfig.on_error='ignore'")]:
        with pytest.raises(ConfigError, match=name.replace(".", "[.]")):
            bad.validate()


def _snapshot(cfg):
    import copy

    return copy.deepcopy(cfg)


@pytest.mark.parametrize("overrides", [
    [], ["objective=scgpt"], ["objective=scgpt", "loss.w_mvc=0"], ["seed=7", "data.seed=3"],
    ["model.vocab_size=100", "deepspeed.zero_stage=3", "nonfinite_policy=skip"],
])
def test_validation_is_pure(overrides):
    cfg = load_config(None, ["data.shards_dir=s", *overrides])
    before = _snapshot(cfg)
    assert cfg.validate() is cfg and cfg == before
    for section in (cfg.model, cfg.data, cfg.loss, cfg.ema, cfg.optim, cfg.deepspeed, cfg.checkpoint, cfg.tracking):
        section.validate()
    assert cfg == before


def test_a_loss_objective_that_does_not_follow_is_an_error_not_a_silent_fix():
    from celljepa_dist.data.stream import LoaderConfig

    cfg = TrainConfig(objective="scgpt", data=LoaderConfig(shards_dir="s"))  # loss section left at celljepa
    with pytest.raises(ConfigError, match=r"loss\.objective='celljepa': must equal objective='scgpt'"):
        cfg.validate()
    assert cfg.loss.objective == "celljepa"  # validation did not change it


def test_derived_defaults_come_from_the_raw_mapping_without_changing_it():
    from celljepa_dist.config import derive_defaults

    raw = {"objective": "scgpt", "seed": "5", "data": {"shards_dir": "s"}}
    out = derive_defaults(raw)
    assert raw == {"objective": "scgpt", "seed": "5", "data": {"shards_dir": "s"}}
    assert out["loss"] == {"objective": "scgpt"} and out["data"] == {"shards_dir": "s", "seed": "5"}
    assert derive_defaults({"data": {"seed": 2}, "seed": 9})["data"]["seed"] == 2  # explicit data.seed wins
    assert derive_defaults({})["data"]["seed"] == TrainConfig.seed


def test_model_config_from_dict_is_the_same_coercing_mapper():
    from celljepa_dist.model.config import ModelConfig

    cfg = ModelConfig.from_dict({"d_model": 64.0, "n_heads": 4, "dropout": 0}, where="m.json")
    assert cfg.d_model == 64 and type(cfg.d_model) is int and type(cfg.dropout) is float
    with pytest.raises(ConfigError, match=r"m\.json: norm_style: 'sandwich' is not one of"):
        ModelConfig.from_dict({"norm_style": "sandwich"}, where="m.json")
    with pytest.raises(ConfigError, match=r"m\.json: ModelConfig\.n_heads=5: must divide"):
        ModelConfig.from_dict({"n_heads": 5}, where="m.json")


def test_the_mapper_and_the_model_config_import_without_torch():
    import subprocess
    import sys

    code = ("import importlib.util, sys\n"
            "import celljepa_dist.typed_config\n"
            f"spec = importlib.util.spec_from_file_location('mc', {str(REPO / 'celljepa_dist/model/config.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['mc'] = m; spec.loader.exec_module(m)\n"
            "m.ModelConfig.from_dict({'d_model': 64, 'n_heads': 4}).validate()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})


def test_flatten_names_every_leaf_by_its_dotted_key():
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml")
    flat = flatten(cfg)
    leaves = _leaf_fields(TrainConfig)
    expected = {k for k in leaves if k != "deepspeed.extra"}  # an empty mapping adds no param
    assert set(flat) == expected
    assert flat["data.seed"] == cfg.seed == 0 and flat["loss.objective"] == "celljepa"


def test_set_errors_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"--set model\.d_modle: unknown key 'd_modle' under model"):
        load_config(None, ["data.shards_dir=s", "model.d_modle=3"])
    with pytest.raises(ConfigError, match=r"model\.d_model: expected an integer, got '6x'"):
        load_config(None, ["data.shards_dir=s", "model.d_model=6x"])
    with pytest.raises(ConfigError, match=r"tracking\.health_thresholds\.max_mean_cos: expected a number"):
        load_config(None, ["data.shards_dir=s", "tracking.health_thresholds.max_mean_cos=high"])
