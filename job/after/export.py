"""`finetune export`: merge a run's LoRA adapter into its base (peft `merge_and_unload`) and write a model that
plain `from_pretrained`, vLLM or TGI load and that stops where the job's evaluation stops; or hand the adapter
itself to vLLM's LoRA serving (`--format vllm`). Output is written like a run: every file, then manifest.json."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job.after.serving import vllm_problems, vllm_serve_command
from job.after.source import RunSource
from job.errors import ConfigError, JobError
from job.settings import MANIFEST
from job.storage import objects as storage

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def refuse_existing_output(output: str) -> None:
    """An export never replaces anything: the destination must be empty or absent."""
    if storage.is_remote(output):
        if storage.list_files(output):
            raise ConfigError(f"--output {output} already holds files; choose an empty destination")
        return
    path = storage.local_path(output)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--output {output} already exists and is not empty; choose a new folder")


def headline_metrics(source: RunSource) -> dict[str, Any]:
    """The tuned model's metrics from the run's manifest ({} when the run was not evaluated)."""
    metrics = (source.manifest or {}).get("metrics") or {}
    return metrics.get("tuned") or {}


def _metrics_table(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "Not evaluated (the run has no metrics in its manifest).\n"
    from job.evaluation.report import headline_markdown

    return headline_markdown({"tuned": metrics})


def _model_card(source: RunSource, *, merged: bool, dtype: str, base: str, stop_tokens: list[str], serve: str) -> str:
    model = source.model_config()
    quantized = model.quantization in ("4bit", "8bit")
    if merged:
        what = f"The LoRA adapter of run `{source.run_id}` merged into `{base}` with peft's `merge_and_unload`, "
        what += f"in {dtype}."
        qlora = (
            f"\n\nThe adapter was trained on a {model.quantization} quantized base (QLoRA). It was merged into "
            f"the base reloaded in {dtype}, never into the quantized "
            "weights, so the merged weights carry no quantization error of their own; they differ slightly from "
            "what the adapter saw during training (the dequantized base)."
            if quantized else ""
        )
    else:
        what = f"The LoRA adapter of run `{source.run_id}` for `{base}`, checked against vLLM's LoRA loader."
        qlora = ""
    return f"""---
base_model: {base}
tags: [text-to-sql, {"merged" if merged else "peft"}]
pipeline_tag: text-generation
---

# Text-to-SQL model from run {source.run_id}

{what}{qlora}

Prompts use the tokenizer's chat template with the job's instruction, the schema and the question, exactly as in
the run's evaluation. Generation stops at {", ".join(f"`{t}`" for t in stop_tokens)}
(`generation_config.json` `eos_token_id`).

## Serve

```sh
{serve}
```

## Evaluation (from the run's manifest)

{_metrics_table(headline_metrics(source))}"""


def _stage_dir(output: str) -> Path:
    if storage.is_remote(output):
        return Path(tempfile.mkdtemp(prefix="finetune-export-"))
    target = storage.local_path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def _publish(stage: Path, output: str, source: RunSource, kind: str, started: str) -> str:
    """Manifest last: local exports appear at once by renaming the finished folder; s3:// ones via publish_run."""
    from job.storage.publish import build_manifest, publish_run

    config = {"export": kind, "source": source.uri, "run_id": source.run_id}
    manifest = build_manifest(stage, config=config, status="exported", started_at=started, ended_at=_now(),
                              metrics={"tuned": headline_metrics(source)} if headline_metrics(source) else None)
    manifest["run_id"] = source.run_id  # the run this model comes from, not the staging folder's name
    try:
        if storage.is_remote(output):
            return publish_run(stage, output, manifest)
        storage.write_json(str(stage / MANIFEST), manifest)
        target = storage.local_path(output)
        if target.is_dir():
            target.rmdir()  # empty (checked before); a non-empty one makes rmdir fail rather than lose anything
        os.rename(stage, target)
        return output
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export_merged(source: RunSource, output: str, dtype: str = "bf16") -> dict[str, Any]:
    """Merge the adapter into the base loaded in `dtype` (never quantized) and write the merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.data.prompts import ChatFormatter
    from job.train.model import resolve_model_path

    check_mergeable(source)
    refuse_existing_output(output)
    started = _now()
    model_cfg = source.model_config()
    base_path = resolve_model_path(model_cfg.name)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, DTYPES[dtype]), "device_map": "cpu",
                              "revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)  # no quantization_config: full precision
    merged = PeftModel.from_pretrained(base, str(source.adapter_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path(base_path))
    formatter = ChatFormatter(tokenizer)
    merged.generation_config.eos_token_id = formatter.stop_ids
    if tokenizer.pad_token_id is not None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    stop_tokens = tokenizer.convert_ids_to_tokens(formatter.stop_ids)
    serve = f"vllm serve {output}"
    stage = _stage_dir(output)
    try:
        merged.save_pretrained(stage, max_shard_size="2GB")  # safetensors shards + index
        tokenizer.save_pretrained(stage)
        (stage / "README.md").write_text(
            _model_card(source, merged=True, dtype=dtype, base=model_cfg.name, stop_tokens=stop_tokens, serve=serve)
        )
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    location = _publish(stage, output, source, "merged", started)
    return {"location": location, "stop_tokens": stop_tokens, "serve": serve}


def export_for_vllm(source: RunSource, output: str) -> dict[str, Any]:
    """Copy the adapter (it must pass vLLM's loader checks) and give the `vllm serve --enable-lora` line."""
    from transformers import AutoConfig

    from job.train.model import resolve_model_path

    check_mergeable(source)  # only LoRA adapters are served as adapters, too
    model_cfg = source.model_config()
    config = source.adapter_config
    model_type = None
    with contextlib.suppress(OSError, ValueError, JobError):  # base not reachable: the decoder modules presets share
        model_type = AutoConfig.from_pretrained(resolve_model_path(model_cfg.name)).model_type
    problems = vllm_problems(source.adapter_dir, model_type)
    if problems:
        raise ConfigError(f"{source.uri}: vLLM would refuse this adapter: {problems[0]}")
    refuse_existing_output(output)
    started = _now()
    serve = vllm_serve_command(model_cfg.name, output, int(config["r"]))
    stage = _stage_dir(output)
    try:
        for name in os.listdir(source.adapter_dir):
            if name.startswith(ADAPTER_FILES) or name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(source.adapter_dir / name, stage / name)
        (stage / "README.md").write_text(
            _model_card(source, merged=False, dtype="-", base=model_cfg.name, stop_tokens=[], serve=serve)
        )
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    location = _publish(stage, output, source, "vllm-lora", started)
    return {"location": location, "serve": serve}


def check_mergeable(source: RunSource) -> None:
    """Only LoRA adapters can be merged (or served by vLLM as adapters)."""
    peft_type = source.adapter_config.get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(
            f"{source.uri}: a {peft_type} adapter has no weights to merge into the base and vLLM serves LoRA only; "
            "serve it with peft (AutoPeftModelForCausalLM on the adapter folder), or train with method.type=lora"
        )
