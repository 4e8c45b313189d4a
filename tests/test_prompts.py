"""Prompts: schema and question in the prompt, the chat template's own format, loss on the answer only."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from job.data.prompts import INSTRUCTION, ChatFormatter
from job.errors import ConfigError


@pytest.fixture(scope="module")
def row(sample_path):
    return json.loads(sample_path.read_text().splitlines()[0])


@pytest.fixture(scope="module")
def gemma_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_prompt_holds_instruction_schema_and_question_in_gemma_format(row, gemma_tokenizer):
    formatter = ChatFormatter(gemma_tokenizer)
    assert formatter.system_role is False  # Gemma's template raises on a system turn
    prompt = formatter.prompt(row)
    assert prompt.startswith("<bos><start_of_turn>user\n" + INSTRUCTION)
    assert row["sql_context"].strip() in prompt and row["sql_prompt"].strip() in prompt
    assert prompt.endswith("<start_of_turn>model\n")
    assert row["sql"] not in prompt


def test_system_role_is_used_when_the_template_has_one(row, tiny_chatml_model):
    formatter = ChatFormatter(AutoTokenizer.from_pretrained(tiny_chatml_model))
    assert formatter.system_role is True
    prompt = formatter.prompt(row)
    assert prompt.startswith(f"<|im_start|>system\n{INSTRUCTION}<|im_end|>")
    assert row["sql_prompt"].strip() in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_labels_cover_the_answer_and_its_end_of_turn_token_only(row, gemma_tokenizer):
    formatter = ChatFormatter(gemma_tokenizer)
    example = formatter.tokenize(row)
    end_of_turn = gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    prompt_ids = gemma_tokenizer(formatter.prompt(row), add_special_tokens=False)["input_ids"]
    assert example.input_ids[: example.prompt_len] == prompt_ids  # identical to the inference prompt
    assert example.labels[: example.prompt_len] == [-100] * example.prompt_len
    answer = example.labels[example.prompt_len :]
    assert -100 not in answer and answer == example.input_ids[example.prompt_len :]
    assert answer[-1] == end_of_turn  # trained on, so the model learns to stop
    assert gemma_tokenizer.decode(answer) == row["sql"].strip() + "<end_of_turn>"


def test_chatml_answer_ends_with_im_end(row, tiny_chatml_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_model)
    example = ChatFormatter(tokenizer).tokenize(row)
    assert example.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(example.labels[example.prompt_len :]) == row["sql"].strip() + "<|im_end|>"


def test_template_without_end_of_turn_gets_eos_appended(row, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    example = ChatFormatter(tokenizer).tokenize(row)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[-1] == tokenizer.eos_token_id


def test_tokenizer_without_chat_template_is_refused(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        ChatFormatter(tokenizer)
