"""Every model-family preset on a tiny model of its architecture: prompt rendering, the system-role rule, the
trained stop token, generation that stops by itself, adapter save/reload, and vLLM's adapter requirements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, PRESET_FAMILY, build_family_model_dir

from job.after.serving import vllm_problems
from job.config import list_presets, load_config
from job.data.prepare import prepare
from job.data.prompts import INSTRUCTION, ChatFormatter
from job.evaluation.generate import generate_predictions
from job.train.model import load_base_model, load_tokenizer, resolve_model_path
from job.train.resume import plan_run
from job.train.trainer import train

GENERATION_PROMPT = {
    "gemma-2": "<start_of_turn>model\n",
    "gemma-3": "<start_of_turn>model\n",
    "llama-3.2": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2.5": "<|im_start|>assistant\n",
}
FAST = [
    "data.max_train_rows=4", "data.max_eval_rows=1", "data.eval_fraction=0.2", "training.max_steps=16",
    "training.per_device_batch_size=4", "training.gradient_accumulation_steps=1", "training.learning_rate=2e-2",
    "training.warmup_ratio=0", "training.lr_scheduler=constant", "training.logging_steps=5",
    "training.save_steps=1000", "training.gradient_checkpointing=false", "training.report_to=none",
]


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory):
    """family name -> tiny model folder, built once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family_model_dir(tmp_path_factory.mktemp(f"tiny-{name}"), FAMILIES[name])
        return built[name]

    return get


def test_every_family_preset_is_covered():
    shipped = {name for name in list_presets() if not name.startswith(("gemma-2b-it", "smollm2"))}
    assert shipped == set(PRESET_FAMILY)


@pytest.mark.parametrize("preset", sorted(PRESET_FAMILY))
def test_preset_trains_stops_reloads_and_serves(preset, family_model, short_rows, tmp_path):
    family = PRESET_FAMILY[preset]
    model_dir = family_model(family.name)
    cfg = load_config(preset, [f"model.name={model_dir}", f"data.source={short_rows}", f"output.uri={tmp_path}",
                               *FAST], environ={})
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, path)
    formatter = ChatFormatter(tokenizer)
    prepared = prepare(cfg, tokenizer)
    row = prepared.splits.train[0]

    # Prompt rendering and the system-role rule.
    assert formatter.system_role is family.system_role
    messages = formatter.messages(row)
    assert [m["role"] for m in messages] == (["system", "user"] if family.system_role else ["user"])
    assert INSTRUCTION in messages[0]["content"]
    prompt = formatter.prompt(row)
    assert prompt.endswith(GENERATION_PROMPT[family.name]) and row["sql_prompt"].strip() in prompt
    # The answer's loss ends on the family's end-of-turn token.
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    example = formatter.tokenize(row)
    assert example.labels[-1] == end_of_turn and end_of_turn in formatter.stop_ids

    plan = plan_run(cfg, "never", overwrite=False)
    result = train(plan.cfg, plan.run, prepared, checkpoint=None, model_path=path, tokenizer=tokenizer)
    losses = [entry["loss"] for entry in result.train_log]
    assert losses[-1] < losses[0] / 2, losses
    base = result.model.get_base_model()
    if family.name == "gemma-2":  # softcapping needs eager (or flash) attention; the preset asks for eager
        assert base.config._attn_implementation == "eager" and base.config.attn_logit_softcapping == 50.0

    # Generation stops by itself, at the family's end-of-turn token.
    prediction = generate_predictions(result.model, tokenizer, [row], batch_size=1, max_new_tokens=48)[0]
    assert prediction["stopped"], prediction
    assert prediction["sql"].rstrip(";").strip() == row["sql"].rstrip(";").strip()

    # The saved adapter reloads with the same logits; vLLM's loader would accept it.
    adapter = plan.run.path / "adapter"
    from peft import PeftModel

    inputs = torch.tensor([example.input_ids])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=inputs).logits
        reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, path), adapter).eval()
        for name, param in reloaded.named_parameters():  # trl trains QLoRA adapters in bf16; peft upcasts on load
            if "lora_" in name and cfg.model.quantization == "4bit":
                param.data = param.data.to(torch.bfloat16)
        reloaded = reloaded(input_ids=inputs).logits
    assert torch.allclose(reloaded, expected, atol=1e-4)
    assert vllm_problems(adapter, family.model_type) == []
    # The adapter's tokenizer renders the same prompt (a base model's configured template travels with it).
    from transformers import AutoTokenizer

    assert ChatFormatter(AutoTokenizer.from_pretrained(adapter)).prompt(row) == prompt
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == cfg.method.lora_r
