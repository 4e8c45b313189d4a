"""The adapter's model card (README.md): base model, dataset, method, hyperparameters, and results when known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from job.config import JobConfig

RESULTS_HEADING = "## Evaluation"


def _front_matter(cfg: JobConfig) -> str:
    meta = {
        "base_model": cfg.model.name if "/" in cfg.model.name and not cfg.model.name.startswith((".", "/")) else None,
        "library_name": "peft",
        "license": "other",
        "datasets": [cfg.data.source] if cfg.data.source.count("/") == 1 else [],
        "tags": ["text-to-sql", "peft", "trl", "sft", "qlora" if cfg.model.quantization == "4bit" else cfg.method.type],
        "pipeline_tag": "text-generation",
    }
    return "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v}, sort_keys=False) + "---\n"


def write_model_card(
    adapter_dir: Path, cfg: JobConfig, prepared: Any, steps: int, packed: bool, world_size: int = 1
) -> Path:
    m, t = cfg.method, cfg.training
    if m.type == "lora":
        method = f"LoRA r={m.lora_r}, alpha={m.lora_alpha}, dropout={m.lora_dropout}, targets {m.target_modules}"
    else:
        method = f"prompt tuning, {m.num_virtual_tokens} virtual tokens initialised from {m.prompt_tuning_init_text!r}"
    base = f"{cfg.model.name} ({'4-bit NF4' if cfg.model.quantization == '4bit' else cfg.model.quantization})"
    train_rows = prepared.stats["splits"]["train"]["kept"]
    global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * world_size
    text = f"""{_front_matter(cfg)}
# Text-to-SQL adapter for {cfg.model.name}

A peft adapter trained with trl's `SFTTrainer` to answer a question about a database with one SQL query,
given the schema (`CREATE TABLE` / `INSERT` statements). Loss on the answer and its end-of-turn token only.

| | |
|---|---|
| Base model | {base} |
| Dataset | {cfg.data.source} ({train_rows} training rows, seed {cfg.data.seed}) |
| Method | {method} |
| Steps | {steps} (global batch {global_batch} = {t.per_device_batch_size} per device x \
{t.gradient_accumulation_steps} accumulation x {world_size} process(es)) |
| Optimizer | {t.optim}, lr {t.learning_rate}, {t.lr_scheduler} schedule, warmup {t.warmup_ratio}, \
max grad norm {t.max_grad_norm} |
| Sequence length | {t.max_seq_len} tokens; {"packed padding-free" if packed else "batches of similar length"} |

## Use

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("PATH/TO/adapter")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/adapter")
```

Prompts use the tokenizer's chat template, with the instruction, the schema and the question in the user turn.

{RESULTS_HEADING}

Not evaluated yet.
"""
    path = adapter_dir / "README.md"
    path.write_text(text)
    return path


def add_results(adapter_dir: Path, results_markdown: str) -> None:
    """Replace the card's evaluation section with the measured numbers."""
    path = adapter_dir / "README.md"
    if not path.is_file():
        return
    head = path.read_text().split(RESULTS_HEADING)[0]
    path.write_text(f"{head}{RESULTS_HEADING}\n\n{results_markdown.strip()}\n")
