"""What vLLM's LoRA loader accepts, checked on a saved peft adapter, and the `vllm serve` line for it.

The constraints come from vLLM's own source (vllm-project/vllm, read via the code search, not from memory):
- `vllm/config/lora.py`: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`; `--max-lora-rank` must be
  one of these, and `PEFTHelper.validate_legal` (`vllm/lora/peft_helper.py`) rejects an adapter whose `r` (or any
  `rank_pattern` value) exceeds it, and any `bias` other than "none".
- `vllm/lora/peft_helper.py` `_validate_features`: "vLLM only supports modules_to_save being None." and
  "vLLM does not yet support DoRA." (also raised in `vllm/lora/lora_model.py` `from_lora_tensors`).
- `vllm/lora/lora_model.py` `from_local_checkpoint` + `vllm/lora/utils.py` `get_supported_lora_modules`: every
  tensor's module suffix must be in the expected modules: the model's linear layers, with packed layers expanded
  through `packed_modules_mapping`; for Gemma, Gemma 2, Llama and Qwen2 that is `qkv_proj` -> q/k/v_proj and
  `gate_up_proj` -> gate/up_proj, plus o_proj and down_proj (lm_head is a ParallelLMHead, not a LinearBase).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from job.errors import ConfigError

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DECODER_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_LORA_MODULES = {model_type: DECODER_LORA_MODULES for model_type in ("gemma", "gemma2", "llama", "qwen2")}


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: not a peft adapter folder (no adapter_config.json)")
    return json.loads(path.read_text())


def adapter_modules(adapter_dir: Path) -> set[str]:
    """Module suffixes (q_proj, ...) that the adapter's saved tensors belong to, read from the safetensors header."""
    from safetensors import safe_open

    modules = set()
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as tensors:
        for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
            parts = name.split(".")
            # `...q_proj.lora_A.weight`, `...embed_tokens.lora_embedding_A`, `...embed_tokens.base_layer.weight`
            # (peft saves the base embedding when it is a target); a whole saved module is `...lm_head.weight`
            marker = next((i for i, p in enumerate(parts) if p.startswith("lora_") or p == "base_layer"),
                          len(parts) - 1)
            modules.add(parts[marker - 1] if marker else name)
    return modules


def vllm_problems(adapter_dir: Path, model_type: str | None = None) -> list[str]:
    """Why vLLM would refuse to load this adapter (empty when it loads): one short reason each."""
    config = read_adapter_config(adapter_dir)
    if config.get("peft_type") != "LORA":
        return [f"peft_type {config.get('peft_type')}: vLLM serves LoRA adapters only; export a merged model instead"]
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM only supports modules_to_save being None")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA adapters; export a merged model instead")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: vLLM supports bias 'none' only")
    rank = max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {rank}: above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    supported = VLLM_LORA_MODULES.get(model_type or "", DECODER_LORA_MODULES)
    unsupported = sorted(adapter_modules(adapter_dir) - supported)
    if unsupported:
        problems.append(f"modules {unsupported}: vLLM's LoRA loader expects only {sorted(supported)}")
    return problems


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds `rank`."""
    return next(value for value in VLLM_MAX_LORA_RANKS if value >= rank)


def vllm_serve_command(base_model: str, adapter_path: str, rank: int, name: str = "sql") -> str:
    """The exact `vllm serve` line that serves the base model with this adapter under `name`."""
    return (
        f"vllm serve {shlex.quote(base_model)} --enable-lora --lora-modules {shlex.quote(f'{name}={adapter_path}')} "
        f"--max-lora-rank {max_lora_rank(rank)}"
    )
