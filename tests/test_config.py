"""Configuration: presets, --set coercion, environment overrides, and one-line errors."""

from __future__ import annotations

import pytest

from job.config import list_presets, load_config
from job.errors import ConfigError


def test_presets_are_listed_with_descriptions():
    presets = list_presets()
    for name in ("gemma-2b-it-qlora", "gemma-2b-it-lora", "gemma-2b-it-prompt-tuning"):
        assert presets.get(name)


def test_default_preset_is_qlora_nf4_double_quant_all_linear():
    cfg = load_config("gemma-2b-it-qlora")
    assert cfg.model.name == "google/gemma-2b-it"
    assert (cfg.model.quantization, cfg.model.bnb_4bit_quant_type) == ("4bit", "nf4")
    assert cfg.model.bnb_4bit_use_double_quant is True
    assert cfg.method.type == "lora" and cfg.method.target_modules == "all-linear"
    assert load_config("gemma-2b-it-prompt-tuning").method.type == "prompt_tuning"
    assert load_config("gemma-2b-it-lora").model.quantization == "none"


def test_set_overrides_are_coerced_to_field_types():
    cfg = load_config(
        "gemma-2b-it-qlora",
        [
            "training.max_steps=5",
            "training.learning_rate=1e-4",
            "training.packing=false",
            "method.target_modules=[q_proj, v_proj]",
            "model.name=./models/x",
            "data.max_train_rows=null",
        ],
        environ={},
    )
    assert cfg.training.max_steps == 5
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.training.packing is False
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.name == "./models/x"
    assert cfg.data.max_train_rows is None


def test_environment_overrides_and_set_wins_over_environment():
    env = {"FINETUNE_OUTPUT_URI": "s3://bucket/runs", "FINETUNE_TRAINING_MAX_STEPS": "7", "FINETUNE_CACHE_DIR": "/x"}
    cfg = load_config("gemma-2b-it-qlora", [], environ=env)
    assert cfg.output.uri == "s3://bucket/runs" and cfg.training.max_steps == 7
    cfg = load_config("gemma-2b-it-qlora", ["training.max_steps=9"], environ=env)
    assert cfg.training.max_steps == 9


def test_config_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name: some/model\ntraining:\n  max_steps: 3\n")
    cfg = load_config(str(path), environ={})
    assert cfg.model.name == "some/model" and cfg.training.max_steps == 3
    assert cfg.method.type == "lora"  # everything else keeps its default


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        ("gemma-2b-it-qlora", ["training.max_stepz=5"], "training.max_stepz"),
        ("gemma-2b-it-qlora", ["trainin.max_steps=5"], "trainin"),
        ("gemma-2b-it-qlora", ["training.max_steps=many"], "training.max_steps"),
        ("gemma-2b-it-qlora", ["model.quantization=3bit"], "model.quantization"),
        ("gemma-2b-it-qlora", ["method.type=adapter"], "method.type"),
        ("gemma-2b-it-qlora", ["training.max_steps=0"], "training.max_steps"),
        ("gemma-2b-it-qlora", ["no-equals-sign"], "key.sub=value"),
        ("no-such-preset", [], "unknown preset 'no-such-preset'"),
        ("missing/config.yaml", [], "config file not found"),
    ],
)
def test_invalid_input_names_the_field(config, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(config, overrides, environ={})
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  epochs: 1\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"training\.learning_rat"):
        load_config(str(path), environ={})


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("gemma-2b-it-qlora", ["training.max_steps=5"], environ={})
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path), environ={}) == cfg
