"""Training memory and throughput: the job's trainer vs a plain trl `SFTTrainer`, each in its own process.

Usage: python benchmarks/bench_training.py [--steps=N] [--models=demo,gemma256k]   (writes runs/bench/training.json)

Two models, the same rows, batch and optimizer steps on both sides, timed around `trainer.train()`:
- `demo`: SmolLM2-135M-Instruct with the demo preset (49k vocabulary);
- `gemma256k`: a Gemma-architecture model with Gemma's real 256,000-token vocabulary and two small layers, built at
  bench time, so the LM head dominates as it does in memory on real Gemma runs.
Every case runs in a fresh subprocess; its peak memory is that process's peak RSS since its exec (VmHWM), and the memory
training adds is the peak minus the RSS just before `trainer.train()`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peak_memory import own_peak_rss_kb

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench"
PRESET = "smollm2-135m-cpu-demo"
GEMMA_VOCAB = 256_000
CASES = ("trl", "job")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return own_peak_rss_kb() / 1024


def gemma256k_model(path: Path) -> Path:
    """A 2-layer Gemma with the real vocabulary size: the tiny test tokenizer's ids, padded to 256,000 rows."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tokenizer

    if (path / "config.json").is_file():
        return path
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=GEMMA_VOCAB, hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=128, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    GemmaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(model: str, steps: int) -> Any:
    from job.config import load_config

    overrides = [f"training.max_steps={steps}", f"output.uri={WORK / 'train'}", "training.save_steps=1000",
                 "training.logging_steps=1", "data.max_eval_rows=4"]
    if model == "gemma256k":
        overrides += [f"model.name={gemma256k_model(WORK / 'gemma256k-model')}", "training.learning_rate=1e-4"]
    return load_config(PRESET, overrides, environ={})


def _plain_trl(cfg: Any, steps: int) -> Any:
    """trl's SFTTrainer with its defaults on conversational prompt/completion rows: the same rows, LoRA and batch."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from job.data.prepare import prepare
    from job.data.prompts import ChatFormatter
    from job.train.model import load_base_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, path)
    formatter = ChatFormatter(tokenizer)
    dataset = datasets.Dataset.from_list([
        {"prompt": formatter.messages(r), "completion": [{"role": "assistant", "content": r["sql"]}]}
        for r in prepare(cfg, tokenizer).splits.train
    ])
    t = cfg.training
    rows_per_step = t.per_device_batch_size * t.gradient_accumulation_steps
    args = SFTConfig(output_dir=str(WORK / "baseline"), max_steps=steps, per_device_train_batch_size=rows_per_step,
                     report_to=[], save_strategy="no", logging_steps=1,
                     learning_rate=t.learning_rate, max_length=t.max_seq_len, dataloader_pin_memory=False,
                     include_num_input_tokens_seen="non_padding", bf16=False)  # a CPU cannot run trl's default bf16
    lora = LoraConfig(r=cfg.method.lora_r, lora_alpha=cfg.method.lora_alpha, lora_dropout=cfg.method.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=load_base_model(cfg.model, path), args=args, train_dataset=dataset,
                      processing_class=tokenizer, peft_config=lora)


def _job(cfg: Any) -> Any:
    from job.data.prepare import prepare
    from job.train.model import load_tokenizer, resolve_model_path
    from job.train.resume import plan_run
    from job.train.trainer import build_trainer

    plan = plan_run(cfg, "never", overwrite=True)
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, path)
    return build_trainer(plan.cfg, plan.run, prepare(plan.cfg, tokenizer), model_path=path, tokenizer=tokenizer)


def run_case(model: str, case: str, steps: int) -> dict[str, Any]:
    """One case in this process: build the trainer, train `steps` optimizer steps, report time and memory."""
    cfg = _config(model, steps)
    trainer = _plain_trl(cfg, steps) if case == "trl" else _job(cfg)
    before = _rss_mb()
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    tokens = trainer.state.num_input_tokens_seen
    t = cfg.training
    return {
        "model": model, "case": case, "steps": steps, "seconds": round(seconds, 1), "real_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1), "peak_rss_mb": round(_peak_rss_mb()),
        "train_added_mb": round(_peak_rss_mb() - before), "rows_per_step": t.per_device_batch_size
        * t.gradient_accumulation_steps, "micro_batch": t.per_device_batch_size if case == "job" else
        t.per_device_batch_size * t.gradient_accumulation_steps,
        "loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
    }


def measure(models: list[str], steps: int) -> list[dict[str, Any]]:
    """Every (model, case) in a fresh subprocess, so that peak RSS belongs to that case alone."""
    results = []
    for model in models:
        for case in CASES:
            out = subprocess.run(
                [sys.executable, __file__, f"--case={model}:{case}", f"--steps={steps}"], cwd=ROOT, check=True,
                capture_output=True, text=True,
            ).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{model} {case}: {results[-1]}", file=sys.stderr, flush=True)
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    """The training table of BENCHMARKS.md: tokens/s and peak memory, job vs plain trl per model."""
    lines = ["| model | trainer | rows/step (micro-batch) | real tokens/s | peak RSS (GiB) | added by training (GiB) | "
             "vs trl: speed, peak memory |", "|---|---|---|---|---|---|---|"]
    baseline = {r["model"]: r for r in results if r["case"] == "trl"}
    for r in results:
        bl = baseline[r["model"]]
        lines.append(
            f"| {r['model']} | {'plain trl SFTTrainer' if r['case'] == 'trl' else 'this job'} | {r['rows_per_step']} "
            f"({r['micro_batch']}) | {r['tokens_per_s']:.0f} | {r['peak_rss_mb'] / 1024:.2f} | "
            f"{r['train_added_mb'] / 1024:.2f} | {r['tokens_per_s'] / bl['tokens_per_s']:.2f}x, "
            f"{r['peak_rss_mb'] / bl['peak_rss_mb']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT))
    options = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    steps = int(options.get("steps", 4))
    if "case" in options:
        model, case = options["case"].split(":")
        print(json.dumps(run_case(model, case, steps)))
        return []
    WORK.mkdir(parents=True, exist_ok=True)
    results = measure(options.get("models", "demo,gemma256k").split(","), steps)
    (WORK / "training.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
