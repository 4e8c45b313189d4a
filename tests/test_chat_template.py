"""model.chat_template: a base model's tokenizer without a template gets a shipped one (or a file's); a tokenizer
with its own keeps it; a bad name is a one-line config error."""

from __future__ import annotations

import pytest
from tiny import GEMMA_TEMPLATE, build_tokenizer

from job.config import load_config
from job.data.prompts import INSTRUCTION, ChatFormatter, chat_template_text, ensure_chat_template
from job.errors import ConfigError

ROW = {"sql_context": "CREATE TABLE t (a INT);", "sql_prompt": "How many rows?", "sql": "SELECT COUNT(*) FROM t;"}


def test_base_tokenizer_gets_gemmas_turn_format():
    tokenizer = build_tokenizer(template=None)
    with pytest.raises(ConfigError, match=r"model\.chat_template"):
        ChatFormatter(tokenizer)
    ensure_chat_template(tokenizer, "gemma")
    formatter = ChatFormatter(tokenizer)
    body = f"{INSTRUCTION}\n\nSchema:\nCREATE TABLE t (a INT);\n\nQuestion: How many rows?"
    assert formatter.prompt(ROW) == f"<bos><start_of_turn>user\n{body}<end_of_turn>\n<start_of_turn>model\n"
    # The same text as Gemma's own instruction template renders with the instruction in the user turn.
    gemma_it = build_tokenizer(template=GEMMA_TEMPLATE)
    assert formatter.prompt(ROW) == gemma_it.apply_chat_template(
        [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    example = formatter.tokenize(ROW)
    answer = tokenizer.decode(example.input_ids[example.prompt_len:])
    assert answer == "SELECT COUNT(*) FROM t;<end_of_turn>"  # the loss ends on Gemma's end of turn
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_chatml_and_file_templates(tmp_path):
    tokenizer = build_tokenizer(template=None)
    ensure_chat_template(tokenizer, "chatml")
    prompt = ChatFormatter(tokenizer).prompt(ROW)
    assert prompt.startswith(f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    custom = tmp_path / "plain.jinja"
    custom.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}[assistant] {% endif %}")
    assert chat_template_text(str(custom)) == custom.read_text()


def test_a_tokenizers_own_template_is_kept():
    tokenizer = build_tokenizer(template=GEMMA_TEMPLATE)
    ensure_chat_template(tokenizer, "chatml")
    assert tokenizer.chat_template == GEMMA_TEMPLATE


def test_unknown_template_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.chat_template nope: neither a shipped template \(gemma, chatml\)"):
        chat_template_text("nope")
    undecodable = tmp_path / "bad.jinja"
    undecodable.write_bytes(b"\xff\xfe{{")
    with pytest.raises(ConfigError, match="cannot read it"):
        chat_template_text(str(undecodable))


def test_gemma3_demo_preset_names_the_gemma_template():
    cfg = load_config("gemma3-270m-cpu-demo", environ={})
    assert cfg.model.chat_template == "gemma" and cfg.model.name.endswith("gemma-3-270m-q4_k_m.gguf")
    assert cfg.model.quantization == "none" and cfg.method.type == "lora"
