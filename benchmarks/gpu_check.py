"""`make gpu-check`: one offline run that measures the job on whatever CUDA GPU it finds; writes gpu.json + Markdown.

Usage: python benchmarks/gpu_check.py [--cpu-smoke] [--out DIR] [--tokenizer PATH] [--parts a,b] [--fail PART]

No Hub and no network: the model is a Gemma-2B-architecture model with random weights (Gemma-2B's published
dimensions), built here; the rows are the shipped real ones; the tokenizer is the demo model's (SmolLM2), carried
in the offline kit (`make gpu-wheels`) or converted from the demo .gguf. Every part runs on its own: a failure is
recorded with its error in gpu.json and the next part runs. gpu.json is rewritten after every part, so a run cut
short still leaves what it measured. `--cpu-smoke` runs every part on a tiny model on the CPU (what CI tests).

The job is reached through its own functions only (`job.config.load_config`, `job.data.prepare.prepare`,
`job.train.trainer.train`, `job.train.model`, `job.evaluation.generate.generate_predictions`, and the `finetune`
CLI in subprocesses); `train_with_job` is the one place that runs the job's trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from gpu_measure import (
    PartFailed,
    PeakMemory,
    StepClock,
    bf16_peak_tflops,
    model_flops_per_token,
    observe_trainers,
    synchronized_now,
)
from gpu_report import markdown, splice_section

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu-kit"
DEMO_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
EPOCH_ROWS = 100_000
"""Rows in gretelai/synthetic_text_to_sql's train split: one epoch of the real run."""

# Gemma-2B (google/gemma-2b, config.json as published): the architecture the default preset fine-tunes.
GEMMA_2B = {
    "hidden_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
    "head_dim": 256, "intermediate_size": 16384, "vocab_size": 256000,
}
GEMMA_COMMON = {
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False,
}
TINY = {  # CPU smoke: the same architecture, a few layers; the vocabulary is the tokenizer's own
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 32, "intermediate_size": 128,  # bitsandbytes' CPU 4-bit kernel needs out_features % 32 == 0
}
SUBPROCESS_MODEL = {  # the `finetune` subprocesses (torchrun, SIGTERM): small so each start stays short
    "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 64, "intermediate_size": 1024,
}

@dataclass
class Plan:
    """How big each part is: the GPU plan fits about 8 minutes on one H200 (model build and loads included)."""

    mode: str
    model: dict[str, int]
    warmup_steps: int
    timed_steps: int
    train_overrides: list[str]
    generation_rows: int
    generation_max_new_tokens: int
    subprocess_model: dict[str, int]
    subprocess_preset: str
    preemption_steps: int
    budget_s: float | None


GPU_PLAN = Plan(
    mode="gpu", model=GEMMA_2B, warmup_steps=3, timed_steps=15, train_overrides=[],
    generation_rows=24, generation_max_new_tokens=64, subprocess_model=SUBPROCESS_MODEL,
    subprocess_preset="gemma-2b-it-qlora", preemption_steps=200,
    budget_s=450.0,
)
CPU_PLAN = Plan(
    mode="cpu-smoke", model=TINY, warmup_steps=1, timed_steps=2,
    train_overrides=["training.per_device_batch_size=2", "training.gradient_accumulation_steps=1",
                     "data.max_train_rows=48", "data.max_eval_rows=8"],
    generation_rows=4, generation_max_new_tokens=8, subprocess_model=TINY,
    subprocess_preset="gemma-2b-it-lora", preemption_steps=5, budget_s=None,  # bitsandbytes is slow on a CPU
)


# ------------------------------------------------------------------------------------------------------- parts


@dataclass
class Context:
    plan: Plan
    args: argparse.Namespace
    work: Path
    results: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    subprocess_model_dir: Path | None = None
    n_params: int = 0
    peak_tflops: float | None = None

    def config(self, preset: str, name: str, *overrides: str) -> Any:
        """The job's config for one part: a shipped preset, the random model, the shipped rows, the plan's sizes."""
        from job.config import load_config
        from job.settings import shipped_sample

        steps = self.plan.warmup_steps + self.plan.timed_steps
        return load_config(preset, [
            f"model.name={self.model_dir}", f"data.source={shipped_sample()}", f"training.max_steps={steps}",
            "training.save_steps=100000", "training.logging_steps=1", f"output.uri={self.work / 'runs'}",
            f"output.run_id={name}", *self.plan.train_overrides, *overrides,
        ], environ={})


def part_environment(ctx: Context) -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {
        "python": platform.python_version(), "versions": versions, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
        "unmet_requirements": _unmet_requirements(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update({
            "gpu": props.name, "gpu_memory_bytes": props.total_memory, "gpu_count": torch.cuda.device_count(),
            "compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "bf16_supported": torch.cuda.is_bf16_supported(), "driver": _nvidia_smi("driver_version"),
        })
    with contextlib.suppress(Exception):
        from bitsandbytes.cextension import lib

        env["bitsandbytes_native"] = type(lib).__name__
    name = env.get("gpu") or "cpu"
    ctx.peak_tflops = ctx.args.peak_tflops or bf16_peak_tflops(name)
    env["bf16_peak_tflops"] = ctx.peak_tflops
    env["bf16_peak_source"] = "--peak-tflops" if ctx.args.peak_tflops else (
        "NVIDIA datasheet, dense bf16 (gpu_check.BF16_PEAK_TFLOPS)" if ctx.peak_tflops else "unknown: MFU not computed")
    return env


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _unmet_requirements() -> list[str]:
    """What `pip check` would say about the job's dependencies (pyproject.toml) and their own direct requirements:
    each one this interpreter lacks or has at a version outside the range. An offline kit can only be checked here.
    """
    import tomllib  # Python 3.11+; the GPU images run 3.12
    from packaging.requirements import Requirement

    wanted = [(Requirement(spec), "finetune-job") for spec in
              tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for req, _ in list(wanted):
        with contextlib.suppress(metadata.PackageNotFoundError):
            wanted += [(Requirement(spec), req.name) for spec in metadata.requires(req.name) or []]
    unmet = []
    for req, by in wanted:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req} for {by} (missing)")
            continue
        if not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{req} for {by} (have {have})")
    return sorted(set(unmet))


def part_model(ctx: Context) -> dict[str, Any]:
    """Random weights at the plan's dimensions, saved as a local model folder with the demo tokenizer."""
    tokenizer, source = _tokenizer(ctx.args.tokenizer)
    started = time.monotonic()
    ctx.model_dir, ctx.n_params = build_random_model(ctx.work / "model", ctx.plan.model, tokenizer)
    result = {"dims": {**ctx.plan.model, "vocab_size": _vocab(ctx.plan.model, tokenizer)}, "parameters": ctx.n_params,
              "build_and_save_s": time.monotonic() - started, "tokenizer": str(source),
              "tokenizer_vocab": len(tokenizer)}
    if ctx.plan.subprocess_model == ctx.plan.model:
        ctx.subprocess_model_dir = ctx.model_dir
    else:
        ctx.subprocess_model_dir, n_small = build_random_model(ctx.work / "model-small", ctx.plan.subprocess_model,
                                                              tokenizer)
        result["subprocess_model_parameters"] = n_small
    return result


def _tokenizer(chosen: Path | None) -> tuple[Any, Path]:
    """The tokenizer and where it came from: --tokenizer, else the kit's copy, else the demo .gguf (converted)."""
    from transformers import AutoTokenizer

    path = chosen or (KIT / "tokenizer" if (KIT / "tokenizer" / "tokenizer_config.json").is_file() else None)
    if path is None:
        from job.train.demo_model import fetch

        gguf = fetch(DEMO_GGUF.parent)  # already there in a checkout that ran `make demo`; else pip fetches it
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), gguf
    return AutoTokenizer.from_pretrained(path), path


def _vocab(dims: dict[str, int], tokenizer: Any) -> int:
    return dims.get("vocab_size") or -(-len(tokenizer) // 64) * 64


def build_random_model(path: Path, dims: dict[str, int], tokenizer: Any) -> tuple[Path, int]:
    """A Gemma model with random weights (bf16 on a GPU, built there), saved with `tokenizer` like a Hub folder."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, GenerationConfig

    from job.data.prompts import stop_token_ids

    cuda = torch.cuda.is_available()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GemmaConfig(**{**GEMMA_COMMON, **dims, "vocab_size": _vocab(dims, tokenizer)},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=pad,
                                               eos_token_id=stop_token_ids(tokenizer))
    n_params = model.num_parameters()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    _free()
    return path, n_params


def train_with_job(ctx: Context, cfg: Any) -> tuple[Any, Any, Any]:
    """The one coupling point with the job's trainer: tokenizer, data stage, run folder, `train()`, as the CLI does.

    Returns (TrainResult, PreparedData, StepClock).
    """
    from job.data.prepare import prepare
    from job.train.model import load_tokenizer
    from job.train.resume import plan_run
    from job.train.trainer import train

    path = str(ctx.model_dir)
    tokenizer = load_tokenizer(cfg.model, path)
    prepared = prepare(cfg, tokenizer)
    plan = plan_run(cfg, "never", overwrite=True)
    with observe_trainers() as clock:
        result = train(plan.cfg, plan.run, prepared, checkpoint=None, model_path=path, tokenizer=tokenizer)
    result.model = None  # free the GPU for the next part
    return result, prepared, clock


def _training_figures(ctx: Context, clock: StepClock, memory: PeakMemory, prepared: Any) -> dict[str, Any]:
    settings = clock.settings
    steady = clock.steady(ctx.plan.warmup_steps, settings["gradient_accumulation_steps"])
    lengths = [len(ids) for ids in prepared.train_features["input_ids"]]
    context = sum(n * n for n in lengths) / sum(lengths)
    flops = model_flops_per_token(ctx.n_params, ctx.plan.model, context)
    mean_row = sum(lengths) / len(lengths)
    figures = {
        **steady, **memory.as_dict(), "settings": settings, "warmup_steps": ctx.plan.warmup_steps,
        "flops_per_token": flops, "mean_context": context, "mean_row_tokens": mean_row,
        "achieved_tflops": steady["real_tokens_per_s"] * flops / 1e12,
        "mfu": steady["real_tokens_per_s"] * flops / (ctx.peak_tflops * 1e12) if ctx.peak_tflops else None,
        "epoch_100k_rows_s": EPOCH_ROWS * mean_row / steady["real_tokens_per_s"],
    }
    return figures


def _job_training_part(preset: str, name: str, *overrides: str) -> Callable[[Context], dict[str, Any]]:
    def part(ctx: Context) -> dict[str, Any]:
        cfg = ctx.config(preset, name, *overrides)
        with PeakMemory() as memory:
            result, prepared, clock = train_with_job(ctx, cfg)
        figures = _training_figures(ctx, clock, memory, prepared)
        figures.update(preset=preset, overrides=list(overrides), global_step=result.global_step,
                       final_loss=result.final_loss, job_real_tokens=result.real_tokens,
                       job_non_padding_share=result.real_tokens / result.processed_tokens)
        return figures

    part.__doc__ = f"The job's trainer, preset {preset} {' '.join(overrides)}".strip()
    return part


def part_qlora_trl_defaults(ctx: Context) -> dict[str, Any]:
    """Plain trl: SFTTrainer with its defaults on the same rows (as prompt/completion chats) and the same 4-bit model.

    Set to the job's values only where a user must choose: batch size and accumulation (same rows per step), max
    length, learning rate, steps; no saving or reporting. bf16 (trl's default) is turned off on a CPU, which cannot
    train in it.
    """
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from job.data.prepare import prepare
    from job.data.prompts import ChatFormatter
    from job.train.model import load_base_model, load_tokenizer, peft_config

    cfg = ctx.config("gemma-2b-it-qlora", "trl-defaults")
    path = str(ctx.model_dir)
    tokenizer = load_tokenizer(cfg.model, path)
    prepared = prepare(cfg, tokenizer)
    formatter = ChatFormatter(tokenizer)
    rows = datasets.Dataset.from_list([
        {"prompt": formatter.messages(r), "completion": [{"role": "assistant", "content": r["sql"]}]}
        for r in prepared.splits.train
    ])
    t = cfg.training
    args = SFTConfig(
        output_dir=str(ctx.work / "runs" / "trl-defaults"), max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_seq_len, learning_rate=t.learning_rate, report_to=[], save_strategy="no", seed=t.seed,
        **({} if torch.cuda.is_available() else {"bf16": False, "dataloader_pin_memory": False}),
    )
    with PeakMemory() as memory, observe_trainers() as clock:
        trainer = SFTTrainer(model=load_base_model(cfg.model, path), args=args, train_dataset=rows,
                             processing_class=tokenizer, peft_config=peft_config(cfg.method, path))
        trainer.train()
        del trainer
    return _training_figures(ctx, clock, memory, prepared)


def part_generation(ctx: Context) -> dict[str, Any]:
    """The job's batched generation vs one row at a time, on the job's default (4-bit) base, same rows, greedy."""
    from job.data.prepare import prepare
    from job.evaluation.generate import generate_predictions
    from job.train.model import load_base_model, load_tokenizer

    cfg = ctx.config("gemma-2b-it-qlora", "generation", f"data.max_eval_rows={ctx.plan.generation_rows}")
    path = str(ctx.model_dir)
    tokenizer = load_tokenizer(cfg.model, path)
    rows = prepare(cfg, tokenizer).splits.eval[: ctx.plan.generation_rows]
    new_tokens = ctx.plan.generation_max_new_tokens
    with PeakMemory() as memory:
        model = load_base_model(cfg.model, path)
        generate_predictions(model, tokenizer, rows[:2], batch_size=2, max_new_tokens=4, label="warmup")
        outputs, figures = {}, {}
        for name, batch_size in (("batched", cfg.evaluation.batch_size), ("one_at_a_time", 1)):
            started = synchronized_now()
            outputs[name] = generate_predictions(model, tokenizer, rows, batch_size=batch_size,
                                                 max_new_tokens=new_tokens, label=name)
            seconds = synchronized_now() - started
            figures[name] = {"batch_size": batch_size, "seconds": seconds, "rows_per_s": len(rows) / seconds,
                             "new_tokens": sum(p["n_new_tokens"] for p in outputs[name])}
        del model
    pairs = list(zip(outputs["batched"], outputs["one_at_a_time"], strict=True))
    differing = [_first_difference(a["raw"], b["raw"]) for a, b in pairs if a["raw"] != b["raw"]]
    return {
        "rows": len(rows), "max_new_tokens": new_tokens, **figures, **memory.as_dict(),
        "speedup": figures["batched"]["rows_per_s"] / figures["one_at_a_time"]["rows_per_s"],
        "identical": len(pairs) - len(differing), "first_difference_chars": sorted(differing),
        "note": "random weights: generation rarely stops early, so both modes generate about max_new_tokens a row",
    }


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _finetune_cmd(ctx: Context, out: Path, steps: int, *extra: str) -> list[str]:
    from job.settings import shipped_sample

    sets = [
        f"model.name={ctx.subprocess_model_dir}", f"data.source={shipped_sample()}", "data.max_eval_rows=4",
        f"training.max_steps={steps}", "training.logging_steps=1", "training.save_steps=100000",
        *ctx.plan.train_overrides,
    ]
    args = ["train", "--config", ctx.plan.subprocess_preset, "--output", str(out), "--run-id", "r1", *extra]
    for item in sets:
        args += ["--set", item]
    return args


def _child_env(ctx: Context) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env.update(FINETUNE_CACHE_DIR=str(ctx.work / "cache"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    return env


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def part_torchrun(ctx: Context) -> dict[str, Any]:
    """`torchrun --nproc_per_node 1 -m job train` (2 steps, QLoRA preset) must exit 0 and leave an adapter."""
    out = ctx.work / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "job",
           *_finetune_cmd(ctx, out, 2)]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(ctx), timeout=300, cwd=ROOT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise PartFailed(f"torchrun exited {done.returncode}: {_tail(done.stderr)}")
    from job.train.trainer import read_train_log

    steps = [e["step"] for e in read_train_log(out / "r1")]
    if steps != [1, 2] or not (out / "r1" / "adapter" / "adapter_config.json").is_file():
        raise PartFailed(f"torchrun run logged steps {steps}; adapter present: "
                         f"{(out / 'r1' / 'adapter' / 'adapter_config.json').is_file()}")
    return {"exit_code": 0, "wall_s": seconds, "steps": steps, "command": " ".join([*cmd[1:4], "..."])}


def part_preemption(ctx: Context) -> dict[str, Any]:
    """`finetune train` gets SIGTERM after its first logged steps: exit 75 with a checkpoint; --resume auto finishes."""
    from job.errors import EXIT_PREEMPTED
    from job.train.trainer import read_train_log

    out, steps = ctx.work / "preemption", ctx.plan.preemption_steps
    env = _child_env(ctx)
    started = time.monotonic()
    log, train_log = ctx.work / "preemption.stderr", out / "r1" / "logs" / "train_log.jsonl"
    with log.open("w") as stderr_file:  # a file, not a pipe: a chatty child never blocks on a full pipe
        process = subprocess.Popen([sys.executable, "-m", "job", *_finetune_cmd(ctx, out, steps)], cwd=ROOT,
                                   env=env, stdout=subprocess.DEVNULL, stderr=stderr_file)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and _complete_lines(train_log) < 2:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=180)
    stderr = log.read_text()
    if code != EXIT_PREEMPTED:
        raise PartFailed(f"after SIGTERM `finetune train` exited {code}, expected {EXIT_PREEMPTED}: {_tail(stderr)}")
    checkpoints = sorted((out / "r1" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise PartFailed("exit 75 but no checkpoint was saved")
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    preempted_s = time.monotonic() - started
    resumed = subprocess.run([sys.executable, "-m", "job", *_finetune_cmd(ctx, out, steps, "--resume", "auto")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if resumed.returncode != 0:
        raise PartFailed(f"resume exited {resumed.returncode}: {_tail(resumed.stderr)}")
    logged = [e["step"] for e in read_train_log(out / "r1")]
    if f"resuming from {checkpoints[-1]}" not in resumed.stderr or logged != list(range(1, steps + 1)):
        raise PartFailed(f"resume did not continue from {checkpoints[-1].name}: logged steps {logged[:5]}...")
    return {"exit_code_after_sigterm": code, "stopped_at_step": stopped_at, "max_steps": steps,
            "resumed_exit_code": 0, "steps_logged_once_each": True, "preempted_run_s": preempted_s,
            "resume_s": time.monotonic() - started - preempted_s, "traceback_printed": "Traceback" in stderr}


def _complete_lines(path: Path) -> int:
    """Lines of `path` already ended by a newline (a line being written is not counted); 0 before it exists."""
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def part_epoch_estimate(ctx: Context) -> dict[str, Any]:
    """One epoch of the 100,000 training rows at each variant's steady real tokens/s (same mean row length)."""
    estimates = {}
    for name in ("qlora_job", "qlora_job_packed", "qlora_trl_defaults", "lora_job"):
        part = ctx.results.get(name, {})
        if part.get("status") == "ok":
            estimates[name] = part["result"]["epoch_100k_rows_s"]
    if not estimates:
        raise PartFailed("no training part succeeded, nothing to estimate from")
    mean_row = next(ctx.results[n]["result"]["mean_row_tokens"] for n in estimates)
    return {"rows": EPOCH_ROWS, "mean_row_tokens": mean_row, "seconds": estimates,
            "basis": "shipped rows' mean length (demo tokenizer) x 100,000 / steady real tokens/s; excludes "
                     "model load, evaluation and checkpoint saves"}


PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": part_environment,
    "model": part_model,
    "qlora_job": _job_training_part("gemma-2b-it-qlora", "qlora-job"),
    "qlora_trl_defaults": part_qlora_trl_defaults,
    "qlora_job_packed": _job_training_part("gemma-2b-it-qlora", "qlora-job-packed", "training.packing=true"),
    "lora_job": _job_training_part("gemma-2b-it-lora", "lora-job"),
    "generation": part_generation,
    "torchrun": part_torchrun,
    "preemption": part_preemption,
    "epoch_estimate": part_epoch_estimate,
}
NEEDS_MODEL = set(PARTS) - {"environment", "model", "epoch_estimate"}


# ------------------------------------------------------------------------------------------------------ running


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_part(ctx: Context, name: str, started: float) -> dict[str, Any]:
    """One part, isolated: its figures, or its error and traceback; never raises."""
    if ctx.plan.budget_s is not None and time.monotonic() - started > ctx.plan.budget_s:
        return {"status": "skipped", "reason": f"time budget of {ctx.plan.budget_s:.0f} s spent before it started"}
    if name in NEEDS_MODEL and ctx.model_dir is None:
        return {"status": "skipped", "reason": "needs the model part, which did not succeed"}
    print(f"== gpu_check: {name}", file=sys.stderr, flush=True)
    part_start = time.monotonic()
    try:
        if name == ctx.args.fail:
            raise RuntimeError(f"injected failure (--fail {name})")
        result = PARTS[name](ctx)
        entry = {"status": "ok", "seconds": time.monotonic() - part_start, "result": result}
    except Exception as exc:  # the point: record any failure of a part and go on with the next
        entry = {"status": "failed", "seconds": time.monotonic() - part_start,
                 "error": f"{type(exc).__name__}: {str(exc).strip()[:2000]}",
                 "traceback": traceback.format_exc()[-4000:]}
        print(f"== gpu_check: {name} FAILED: {entry['error']}", file=sys.stderr, flush=True)
    _free()
    return entry


def run(ctx: Context, names: list[str], out: Path) -> dict[str, Any]:
    started = time.monotonic()
    report: dict[str, Any] = {
        "schema": 1, "mode": ctx.plan.mode, "started_at": _now(), "command": " ".join(sys.argv),
        "plan": asdict(ctx.plan), "parts": ctx.results,
    }
    for name in names:
        ctx.results[name] = run_part(ctx, name, started)
        report.update(finished_at=_now(), wall_s=time.monotonic() - started)
        write_outputs(report, out)
    return report


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_outputs(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out / "gpu.json")
    (out / "gpu_check.md").write_text(markdown(report))


# --------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="Tiny model, a few steps, on the CPU (CI).")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check", help="Folder for gpu.json.")
    parser.add_argument("--work", type=Path, help="Scratch folder for models and runs (default: a temporary one).")
    parser.add_argument("--tokenizer", type=Path, help="Tokenizer folder (default: .gpu-kit/tokenizer, else the "
                        "demo .gguf in models/).")
    parser.add_argument("--parts", help=f"Comma-separated subset of: {', '.join(PARTS)}.")
    parser.add_argument("--fail", metavar="PART", help="Make PART fail on purpose (tests the failure path).")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak for MFU when the GPU is not in the table.")
    parser.add_argument("--budget-s", type=float, help="Skip parts not started after this many seconds.")
    parser.add_argument("--benchmarks", type=Path, help="Also put the Markdown section into this BENCHMARKS.md.")
    parser.add_argument("--from-json", type=Path, help="Only re-render the Markdown of an existing gpu.json.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        section = markdown(json.loads(args.from_json.read_text()))
        (args.from_json.parent / "gpu_check.md").write_text(section)
        if args.benchmarks:
            splice_section(section, args.benchmarks)
        print(section)
        return 0
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"  # no Hub, no network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU found; run with --cpu-smoke for the CPU check", file=sys.stderr)
        return 2
    plan = CPU_PLAN if args.cpu_smoke else GPU_PLAN
    if args.budget_s is not None:
        plan.budget_s = args.budget_s
    names = list(PARTS) if not args.parts else [n.strip() for n in args.parts.split(",")]
    unknown = [n for n in names if n not in PARTS]
    if unknown or (args.fail and args.fail not in PARTS):
        print(f"error: unknown part {(unknown or [args.fail])[0]!r}; parts: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if any(n in NEEDS_MODEL for n in names) and "model" not in names:
        names.insert(0, "model")
    if "environment" not in names:
        names.insert(0, "environment")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = args.work or Path(scratch)
        os.environ["FINETUNE_CACHE_DIR"] = str(work / "cache")
        os.environ["HF_DATASETS_CACHE"] = str(work / "datasets")
        report = run(Context(plan=plan, args=args, work=work), names, args.out)
    section = markdown(report)
    if args.benchmarks:
        splice_section(section, args.benchmarks)
    print(section)
    failed = [n for n, e in report["parts"].items() if e["status"] != "ok"]
    print(f"wrote {args.out / 'gpu.json'}" + (f"; not ok: {', '.join(failed)}" if failed else "; every part ok"),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
