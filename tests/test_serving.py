"""Every preset's adapter against what vLLM's LoRA loader requires (rank, target modules, no modules_to_save, no
DoRA, no bias), on adapters peft saves for the tiny model; and the check refuses what vLLM refuses."""

from __future__ import annotations

import pytest

from job.after.serving import VLLM_MAX_LORA_RANKS, max_lora_rank, vllm_problems, vllm_serve_command
from job.config import list_presets, load_config
from job.train.model import peft_config


def _save_adapter(base_dir, path, config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(path)
    return path


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_every_preset_saves_an_adapter_vllm_loads(preset, tiny_model, tmp_path):
    cfg = load_config(preset, [f"model.name={tiny_model}"], environ={})
    adapter = _save_adapter(tiny_model, tmp_path / "adapter", peft_config(cfg.method, str(tiny_model)))
    problems = vllm_problems(adapter, "gemma")
    if cfg.method.type == "prompt_tuning":
        assert problems == ["peft_type PROMPT_TUNING: vLLM serves LoRA adapters only; export a merged model instead"]
    else:
        assert problems == []
        assert cfg.method.lora_r <= VLLM_MAX_LORA_RANKS[-1] and not cfg.method.use_dora


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']: vLLM only supports"),
        ({"use_dora": True}, "use_dora: vLLM does not support DoRA adapters"),
        ({"bias": "lora_only"}, "bias 'lora_only'"),
        ({"r": 1024, "lora_alpha": 16}, "rank 1024: above vLLM's largest --max-lora-rank 512"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "modules ['embed_tokens']"),
    ],
)
def test_check_refuses_what_vllm_refuses(change, problem, tiny_model, tmp_path):
    from peft import LoraConfig, TaskType

    settings = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **change}
    adapter = _save_adapter(tiny_model, tmp_path / "adapter", LoraConfig(task_type=TaskType.CAUSAL_LM, **settings))
    problems = vllm_problems(adapter, "gemma")
    assert problems[0].startswith(problem), problems


def test_serve_line_uses_the_smallest_rank_vllm_accepts():
    assert [max_lora_rank(r) for r in (1, 2, 16, 17, 300, 512)] == [1, 8, 16, 32, 320, 512]
    assert vllm_serve_command("google/gemma-2b-it", "/runs/r 1/adapter", 16) == (
        "vllm serve google/gemma-2b-it --enable-lora --lora-modules 'sql=/runs/r 1/adapter' --max-lora-rank 16"
    )


def test_dora_and_rslora_reach_peft(tiny_model):
    cfg = load_config("gemma-2b-it-lora", ["method.use_dora=true", "method.use_rslora=true"], environ={})
    lora = peft_config(cfg.method, str(tiny_model))
    assert lora.use_dora is True and lora.use_rslora is True
    plain = peft_config(load_config("gemma-2b-it-lora", environ={}).method, str(tiny_model))
    assert plain.use_dora is False and plain.use_rslora is False
