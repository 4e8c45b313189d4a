"""Model stage: device/dtype/optimizer defaults, path resolution, and the GGUF conversion cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from job.config import load_config
from job.errors import ConfigError
from job.train.model import compute_dtype, quantization_config, resolve_model_path
from job.train.trainer import _optimizer


def _fake_gpu(monkeypatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_dtype_defaults_follow_the_hardware(monkeypatch):
    cfg = load_config("gemma-2b-it-qlora", environ={})
    assert compute_dtype(cfg.model) == torch.float32  # CPU
    _fake_gpu(monkeypatch, bf16=True)
    assert compute_dtype(cfg.model) == torch.bfloat16
    _fake_gpu(monkeypatch, bf16=False)
    assert compute_dtype(cfg.model) == torch.float16
    assert compute_dtype(load_config("gemma-2b-it-qlora", ["model.dtype=float32"], environ={}).model) == torch.float32


def test_qlora_config_is_nf4_double_quant_with_compute_dtype(monkeypatch):
    _fake_gpu(monkeypatch, bf16=True)
    quant = quantization_config(load_config("gemma-2b-it-qlora", environ={}).model)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(load_config("gemma-2b-it-lora", environ={}).model) is None


def test_4bit_without_cuda_warns_that_it_is_slow(caplog):
    with caplog.at_level(logging.WARNING, logger="job.train.model"):
        quantization_config(load_config("gemma-2b-it-qlora", environ={}).model)
    assert "slow" in caplog.text


def test_optimizer_defaults():
    cfg = load_config("gemma-2b-it-qlora", environ={})
    assert _optimizer(cfg, quantized=True, cuda=True) == "paged_adamw_8bit"
    assert _optimizer(cfg, quantized=False, cuda=True) == "adamw_torch_fused"
    assert _optimizer(cfg, quantized=True, cuda=False) == "adamw_torch"
    pinned = load_config("gemma-2b-it-qlora", ["training.optim=adafactor"], environ={})
    assert _optimizer(pinned, quantized=True, cuda=True) == "adafactor"


def test_model_paths(tmp_path, tiny_model):
    assert resolve_model_path(str(tiny_model)) == str(tiny_model)
    assert resolve_model_path("google/gemma-2b-it") == "google/gemma-2b-it"  # a Hub id, loaded by transformers
    with pytest.raises(ConfigError, match=r"no such \.gguf"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match=r"no config\.json"):
        resolve_model_path(str(tmp_path))


def test_gguf_is_converted_once_and_cached(tmp_path):
    """A .gguf file (written at test time, offline) -> safetensors once; the second resolve reuses the cache."""
    from tiny import build_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = build_gguf(tmp_path / "tiny.gguf")
    converted = resolve_model_path(str(gguf))
    weights = next(Path(converted).glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert resolve_model_path(str(gguf)) == converted
    assert weights.stat().st_mtime_ns == stamp
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.chat_template and "<|im_end|>" in tokenizer.get_vocab()
    assert tokenizer.decode(tokenizer("SELECT name FROM t;")["input_ids"]) == "SELECT name FROM t;"
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = torch.tensor([tokenizer("SELECT 1")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)  # the weights survived
