"""Tiny models of the preset families (Gemma 2, Gemma 3, Llama 3.2, Qwen 2.5), built at test time with tokenizers whose
chat templates behave like the real ones: special tokens, system-role rule, end-of-turn token, EOS."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tiny import GEMMA_TEMPLATE, train_bpe

# Llama 3.2 Instruct: always a system header (with its date lines), the user's system message inside it; <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}{{ 'Cutting Knowledge Date: December 2023\n' }}"
    "{{ 'Today Date: 26 Jul 2024\n\n' }}{{ system_message }}{{ '<|eot_id|>' }}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen 2.5 Instruct (ChatML): a default system turn when the conversation has none; <|im_end|>.
QWEN25_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    presets: tuple[str, ...]
    template: str | None
    """None: the tokenizer has no chat template (a base model); the preset's model.chat_template supplies it."""
    end_of_turn: str
    system_role: bool
    bos: str | None
    eos: str
    pad: str | None
    specials: tuple[str, ...]
    generation_eos: tuple[str, ...]
    """What the real model's generation_config.json lists as eos_token_id."""
    model_type: str
    extra_config: dict = field(default_factory=dict)


FAMILIES = {
    "gemma-2": Family(
        "gemma-2", ("gemma-2-2b-it-qlora",), GEMMA_TEMPLATE, "<end_of_turn>", False, "<bos>", "<eos>", "<pad>",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), ("<eos>", "<end_of_turn>"),
        "gemma2", {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16,
                   "sliding_window": 64},
    ),
    # Gemma 3 270M is a base model: its tokenizer has no template, the preset names the shipped `gemma` one.
    "gemma-3": Family(
        "gemma-3", ("gemma3-270m-cpu-demo",), None, "<end_of_turn>", True, "<bos>", "<eos>", "<pad>",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), ("<eos>",),
        "gemma3_text", {"query_pre_attn_scalar": 32, "sliding_window": 64, "tie_word_embeddings": True},
    ),
    "llama-3.2": Family(
        "llama-3.2", ("llama-3.2-1b-instruct-lora", "llama-3.2-3b-instruct-qlora"), LLAMA3_TEMPLATE, "<|eot_id|>",
        True, "<|begin_of_text|>", "<|eot_id|>", None,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<unk>"), ("<|end_of_text|>", "<|eot_id|>"),
        "llama", {"tie_word_embeddings": True},
    ),
    "qwen2.5": Family(
        "qwen2.5", ("qwen2.5-1.5b-instruct-lora", "qwen2.5-coder-1.5b-instruct-lora"), QWEN25_TEMPLATE,
        "<|im_end|>", True, None, "<|im_end|>", "<|endoftext|>",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"), ("<|im_end|>", "<|endoftext|>"),
        "qwen2", {"tie_word_embeddings": True},
    ),
}
PRESET_FAMILY = {preset: family for family in FAMILIES.values() for preset in family.presets}


def build_family_tokenizer(family: Family, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on the shipped sample, with the family's special tokens and template."""
    from transformers import PreTrainedTokenizerFast

    core = train_bpe(list(family.specials), vocab_size)
    named = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad, "unk_token": "<unk>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, **{k: v for k, v in named.items() if v},
        additional_special_tokens=[t for t in family.specials if t not in named.values()],
    )
    tokenizer.chat_template = family.template
    return tokenizer


def build_family_model_dir(path: Path, family: Family, seed: int = 0) -> Path:
    """Save a 2-layer model of the family's architecture and its tokenizer to `path`.

    Every projection is 64 or 128 wide: bitsandbytes' CPU 4-bit inference kernel needs widths divisible by its block."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = build_family_tokenizer(family)
    torch.manual_seed(seed)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in family.specials}
    config = AutoConfig.for_model(
        family.model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, **family.extra_config,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[ids[t] for t in family.generation_eos],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
