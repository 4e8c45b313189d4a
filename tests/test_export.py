"""`finetune export`: merged models equal the adapter on its base, load with plain transformers and stop by
themselves; QLoRA merges into a full-precision base; vLLM format; bad input never overwrites anything."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from after_fixtures import one_line_error, train_rows
from cli_runner import run_cli

from job.data.prompts import ChatFormatter
from job.errors import EXIT_USAGE

ROW = {"sql_context": "CREATE TABLE t (a INT);", "sql_prompt": "How many rows?", "sql": ""}


def _peft_logits(base_dir: Path, adapter: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


def _check_manifest(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    for rel, digest in listed.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    return manifest


def test_merged_export_equals_the_adapter_loads_plainly_and_stops(capsys, tmp_path, lora_run, eos_only_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code, stdout, stderr = run_cli(capsys, "export", str(lora_run), "--output", str(out), "--dtype", "fp32")
    assert code == 0, stderr
    assert f"serve with: vllm serve {out}" in stdout and "<end_of_turn>" in stdout
    assert list(out.glob("model*.safetensors")) and (out / "tokenizer.json").is_file()
    manifest = _check_manifest(out)
    assert manifest["status"] == "exported" and manifest["run_id"] == manifest["config"]["run_id"] == "r1"

    tokenizer = AutoTokenizer.from_pretrained(out)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert end_of_turn in generation["eos_token_id"] and tokenizer.eos_token_id in generation["eos_token_id"]
    card = (out / "README.md").read_text()
    assert "merge_and_unload" in card and "Execution accuracy" in card and f"vllm serve {out}" in card

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert not any("lora" in name for name, _ in merged.named_parameters())
    row = train_rows(lora_run)[0]
    prompt = ChatFormatter(tokenizer).prompt(row)
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = merged(input_ids=input_ids).logits
    expected = _peft_logits(eos_only_base, lora_run / "adapter", input_ids)
    assert torch.allclose(logits, expected, atol=1e-4)
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(eos_only_base)(input_ids=input_ids).logits
    assert not torch.allclose(base_logits, expected, atol=1e-2)  # the merge carried the training

    # Plain generate() with nothing but the exported generation_config stops at <end_of_turn>.
    generated = merged.generate(input_ids=input_ids, max_new_tokens=48, do_sample=False)[0, input_ids.shape[1]:]
    assert generated[-1].item() == end_of_turn and len(generated) < 48
    assert tokenizer.decode(generated, skip_special_tokens=True).strip() == row["sql"].strip()


def test_qlora_adapter_merges_into_a_full_precision_base(capsys, tmp_path, qlora_run, eos_only_base):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged-qlora"
    code, _, stderr = run_cli(capsys, "export", str(qlora_run), "--output", str(out), "--dtype", "fp32")
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    card = (out / "README.md").read_text()
    assert "4bit quantized base (QLoRA)" in card and "never into the quantized" in card
    assert "Not evaluated" in card
    input_ids = torch.arange(5, 30).reshape(1, 25)
    with torch.no_grad():
        logits = merged(input_ids=input_ids).logits
    assert torch.allclose(logits, _peft_logits(eos_only_base, qlora_run / "adapter", input_ids), atol=1e-3)


def test_vllm_format_copies_a_checked_adapter_and_prints_the_serve_line(capsys, tmp_path, lora_run, eos_only_base):
    out = tmp_path / "vllm"
    code, stdout, stderr = run_cli(capsys, "export", str(lora_run), "--output", str(out), "--format", "vllm")
    assert code == 0, stderr
    line = f"vllm serve {eos_only_base} --enable-lora --lora-modules sql={out} --max-lora-rank 16"
    assert f"serve with: {line}" in stdout and line in (out / "README.md").read_text()
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (lora_run / "adapter" / weights).read_bytes()
    _check_manifest(out)


def test_export_to_s3_writes_the_manifest_last(capsys, tmp_path, lora_run, s3_bucket, s3_client):
    code, _, stderr = run_cli(capsys, "export", str(lora_run), "--output", f"s3://{s3_bucket}/exports/m1",
                              "--dtype", "fp32")
    assert code == 0, stderr
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="exports/m1/")["Contents"]}
    manifest = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="exports/m1/manifest.json")["Body"].read())
    assert {f"exports/m1/{f['path']}" for f in manifest["files"]} | {"exports/m1/manifest.json"} == keys
    code, _, stderr = run_cli(capsys, "export", str(lora_run), "--output", f"s3://{s3_bucket}/exports/m1")
    assert code == EXIT_USAGE and "already holds files" in stderr


def _adapter(base: Path, path: Path, peft_config) -> Path:
    """An untrained adapter with random (not zero) LoRA B, so that it changes the model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft_config)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def odd_adapters(tmp_path_factory, eos_only_base):
    from peft import LoraConfig, PromptTuningConfig, TaskType

    root = tmp_path_factory.mktemp("odd-adapters")
    return {
        "prompt": _adapter(eos_only_base, root / "prompt", PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                             num_virtual_tokens=4)),
        "dora": _adapter(eos_only_base, root / "dora", LoraConfig(task_type=TaskType.CAUSAL_LM, r=8,
                                                                 target_modules="all-linear", use_dora=True,
                                                                 use_rslora=True)),
    }


def test_dora_rslora_adapter_merges_exactly(capsys, tmp_path, odd_adapters, eos_only_base):
    from transformers import AutoModelForCausalLM

    config = json.loads((odd_adapters["dora"] / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    out = tmp_path / "merged-dora"
    code, _, stderr = run_cli(capsys, "export", str(odd_adapters["dora"]), "--output", str(out), "--dtype", "fp32")
    assert code == 0, stderr
    input_ids = torch.arange(5, 30).reshape(1, 25)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=input_ids).logits
        base = AutoModelForCausalLM.from_pretrained(eos_only_base)(input_ids=input_ids).logits
    expected = _peft_logits(eos_only_base, odd_adapters["dora"], input_ids)
    assert torch.allclose(logits, expected, atol=1e-4) and not torch.allclose(base, expected, atol=1e-2)


def test_bad_input_exits_with_one_line_and_overwrites_nothing(capsys, tmp_path, lora_run, odd_adapters):
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "export", str(odd_adapters["prompt"]), "--output", str(out))
    one_line_error(code, stderr, EXIT_USAGE, "PROMPT_TUNING adapter has no weights to merge")
    assert "AutoPeftModelForCausalLM" in stderr and not out.exists()
    code, _, stderr = run_cli(capsys, "export", str(odd_adapters["prompt"]), "--output", str(out), "--format", "vllm")
    one_line_error(code, stderr, EXIT_USAGE, "vLLM serves LoRA only")

    code, _, stderr = run_cli(capsys, "export", str(odd_adapters["dora"]), "--output", str(out), "--format", "vllm")
    one_line_error(code, stderr, EXIT_USAGE, "vLLM does not support DoRA")
    assert not out.exists()

    code, _, stderr = run_cli(capsys, "export", str(tmp_path / "nope"), "--output", str(out))
    one_line_error(code, stderr, EXIT_USAGE, "RUN_OR_ADAPTER")  # a local path the user typed: exit 2
    assert "no such file or folder" in stderr

    code, _, stderr = run_cli(capsys, "export", str(tmp_path), "--output", str(out))
    one_line_error(code, stderr, EXIT_USAGE, "not a run folder")

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run_cli(capsys, "export", str(lora_run), "--output", str(out))
    one_line_error(code, stderr, EXIT_USAGE, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    code, _, stderr = run_cli(capsys, "export", str(lora_run), "--output", str(tmp_path / "x"), "--dtype", "int4")
    one_line_error(code, stderr, EXIT_USAGE, "--dtype")
    assert not list(tmp_path.glob(".x.partial-*")) and not (tmp_path / "x").exists()
