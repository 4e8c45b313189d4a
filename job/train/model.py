"""The model stage: resolve the base (Hub id, local dir, .gguf, s3://), load it (optionally 4/8-bit), attach peft."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from job.config import JobConfig, MethodConfig, ModelConfig
from job.data.prompts import ensure_chat_template
from job.errors import ConfigError, MissingInputError
from job.settings import cache_root

log = logging.getLogger(__name__)


def _converted_gguf(gguf: Path) -> Path:
    """Convert a .gguf file once to a safetensors model directory in the cache, keyed by file identity."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    tmp = target.with_name(target.name + ".tmp")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers keeps a GGUF quantizer on the model, which refuses to save: hand the dequantized weights to a
    # plain model of the same architecture, built without storage of its own (no second copy in memory).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").touch()
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve_model_path(name: str) -> str:
    """A local directory or a Hub id that `from_pretrained` can load."""
    if name.startswith("s3://"):
        from job.storage.objects import fetch_to_cache

        fetched = fetch_to_cache(name, cache_root() / "models")
        return str(_converted_gguf(fetched) if fetched.suffix == ".gguf" else fetched)
    path = Path(name.removeprefix("file://")).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            from job.train.demo_model import fetch_hint

            raise ConfigError(f"model.name {name}: no such .gguf file{fetch_hint(path)}")
        return str(_converted_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name {name}: not a model directory (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name {name}: no such directory")
    return name


def _hub_error(name: str, exc: Exception) -> MissingInputError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return MissingInputError(f"model.name {name}: cannot load ({type(exc).__name__}: {first[:200]})")


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> Any:
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _hub_error(cfg.name, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer, cfg.chat_template)
    return tokenizer


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(cfg: ModelConfig) -> Any:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU, unless the config names one."""
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(cfg: ModelConfig, sharded: bool = False) -> Any:
    """bitsandbytes settings; `sharded` (FSDP) stores the 4-bit weights in the compute dtype, which FSDP can
    shard (it cannot shard uint8 storage)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if not has_cuda():
        log.warning("model.quantization=%s without CUDA: bitsandbytes runs on the CPU, which is slow", cfg.quantization)
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        **({"bnb_4bit_quant_storage": compute_dtype(cfg)} if sharded else {}),
    )


def device_map() -> Any:
    """One whole model per process: the local GPU under torchrun/accelerate, else GPU 0, else the CPU."""
    if not has_cuda():
        return "cpu"
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_base_model(cfg: ModelConfig, path: str | None = None, sharded: bool = False) -> Any:
    """The base model, quantized as configured, placed on this process's device (`sharded`: for FSDP)."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg.name)
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype(cfg),
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "device_map": device_map(),
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quant = quantization_config(cfg, sharded)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _hub_error(cfg.name, exc) from None


def peft_config(method: MethodConfig, tokenizer_path: str) -> Any:
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if method.type == "lora":
        return LoraConfig(
            r=method.lora_r,
            lora_alpha=method.lora_alpha,
            lora_dropout=method.lora_dropout,
            target_modules=method.target_modules,
            use_dora=method.use_dora,
            use_rslora=method.use_rslora,
            bias="none",
            task_type=TaskType.CAUSAL_LM,
        )
    init_text = method.prompt_tuning_init_text
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=method.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if init_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=init_text,
        tokenizer_name_or_path=tokenizer_path if init_text else None,
    )


def is_quantized(model: Any) -> bool:
    return getattr(model, "hf_quantizer", None) is not None


def prepare_for_training(model: Any, cfg: JobConfig) -> Any:
    """QLoRA's preparation of a k-bit base (norms in fp32, input grads, checkpointing); other bases as they are."""
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
