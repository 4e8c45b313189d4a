"""The Markdown section of a gpu.json for BENCHMARKS.md, and keeping it there when `make bench` rewrites the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARK_BEGIN, MARK_END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


def _gib(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**30:.2f} GiB"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


TRAINING_ROWS = [
    ("qlora_trl_defaults", "plain trl `SFTTrainer` defaults (baseline)"),
    ("qlora_job", "this job, defaults (`gemma-2b-it-qlora`)"),
    ("qlora_job_packed", "this job, `training.packing=true` (padding-free)"),
    ("lora_job", "this job, LoRA on the bf16 base (`gemma-2b-it-lora`)"),
]


def markdown(report: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: what ran where, the figures against trl's defaults, and every failure."""
    parts = report["parts"]

    def ok(name: str) -> dict[str, Any] | None:
        entry = parts.get(name) or {}
        return entry.get("result") if entry.get("status") == "ok" else None

    env = ok("environment") or {}
    where = env.get("gpu") or f"CPU only ({env.get('cpu_count')} cores)"
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    lines = [
        MARK_BEGIN,
        f"## GPU check: {where}, {report['started_at'][:10]}" + (" (CPU smoke: code paths, not figures)"
                                                                if report["mode"] == "cpu-smoke" else ""),
        "",
        f"`{report['command']}` ({report['mode']} plan), {report.get('wall_s', 0) / 60:.1f} min in all. "
        f"CUDA {env.get('cuda')}, driver {env.get('driver')}, Python {env.get('python')}, {versions}.",
    ]
    model = ok("model")
    if model:
        dims = model["dims"]
        n = model["parameters"]
        size = f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
        lines += ["", f"Model: Gemma architecture with random weights, {size} parameters "
                  f"(hidden {dims['hidden_size']}, {dims['num_hidden_layers']} layers, {dims['num_attention_heads']} "
                  f"heads, {dims['num_key_value_heads']} KV head, head_dim {dims['head_dim']}, intermediate "
                  f"{dims['intermediate_size']}, vocabulary {dims['vocab_size']}); rows: the shipped real gretel "
                  f"rows, tokenized with `{model['tokenizer']}` ({model['tokenizer_vocab']:,} tokens; the demo "
                  f"SmolLM2 tokenizer has 49,152)."]
    base = ok("qlora_trl_defaults")
    rows = []
    for name, label in TRAINING_ROWS:
        r = ok(name)
        if not r:
            rows.append(f"| {label} | {parts.get(name, {}).get('status', 'not run')} | | | | | | |")
            continue
        s = r["settings"]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        share = f"{r['non_padding_share']:.0%}" if r.get("non_padding_share") else "n/a"
        speed, memory = r["real_tokens_per_s"], r["peak_memory_bytes"]
        weights = f"4-bit {s['bnb_4bit_quant_type']}" if s["load_in_4bit"] else "16/32-bit base"
        rows.append(
            f"| {label} | {speed:,.0f} | {_ratio(speed, base and base['real_tokens_per_s'])} "
            f"| {_gib(memory)} | {_ratio(memory, base and base['peak_memory_bytes'])} "
            f"| {mfu} | {share} | {s['optim']}, {weights}"
            f", batch {s['per_device_train_batch_size']}x{s['gradient_accumulation_steps']}, "
            f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, {s['attn_implementation']} |"
        )
    any_training = next((ok(n) for n, _ in TRAINING_ROWS if ok(n)), None)
    if any_training:
        lines += [
            "", "### Training (QLoRA unless noted), same model and rows, in the same run", "",
            f"{any_training['warmup_steps']} warmup steps, then {any_training['timed_steps']} timed optimizer steps "
            "each. Real tokens: non-padding tokens trained on. Peak memory: "
            f"`{any_training['memory_kind']}` over the part (model load included). MFU = real tokens/s x "
            f"(6·N + 12·L·heads·head_dim·s) / bf16 dense peak ({env.get('bf16_peak_tflops')} TFLOP/s, "
            f"{env.get('bf16_peak_source')}); s = Σlen²/Σlen = {any_training['mean_context']:.0f} tokens.",
            "",
            "| | real tokens/s | vs trl | peak memory | vs trl | MFU | non-padding | settings |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    leftovers = [(n, (ok(n) or {}).get("memory_allocated_at_start") or 0) for n in parts]
    leftovers = [(n, b) for n, b in leftovers if b > 2**28]
    if leftovers:
        lines += ["", "Memory still allocated when a part started (included in its peak): "
                  + ", ".join(f"{n} {_gib(b)}" for n, b in leftovers) + "."]
    gen = ok("generation")
    lines += _goals(ok("qlora_job"), base, gen)
    if gen:
        lines += [
            "", "### Generation: the job's batched evaluation vs one row at a time", "",
            f"{gen['rows']} held-out rows, greedy, max_new_tokens {gen['max_new_tokens']}, 4-bit base. Identical "
            f"predictions: {gen['identical']} of {gen['rows']}"
            + (f" (the others first differ at characters {gen['first_difference_chars']})"
               if gen["first_difference_chars"] else "") + ". " + gen["note"] + ".",
            "",
            "| | rows/s | new tokens |", "|---|---|---|",
            f"| one at a time | {gen['one_at_a_time']['rows_per_s']:.2f} | {gen['one_at_a_time']['new_tokens']} |",
            f"| batched (batch {gen['batched']['batch_size']}) | {gen['batched']['rows_per_s']:.2f} | "
            f"{gen['batched']['new_tokens']} |",
            f"| ratio | {gen['speedup']:.1f}x | |",
        ]
    lines += ["", "### Subprocess checks", ""]
    torchrun, pre = ok("torchrun"), ok("preemption")
    lines.append("- 1-process `torchrun` `finetune train`, 2 steps: "
                 + (f"exit 0, adapter saved ({torchrun['wall_s']:.0f} s)" if torchrun else _status(parts, "torchrun")))
    lines.append("- SIGTERM during `finetune train`: "
                 + (f"exit {pre['exit_code_after_sigterm']} with checkpoint-{pre['stopped_at_step']}; "
                    f"`--resume auto` finished all {pre['max_steps']} steps, each logged once"
                    if pre else _status(parts, "preemption")))
    estimate = ok("epoch_estimate")
    if estimate:
        per = ", ".join(f"{n} {_minutes(s)}" for n, s in estimate["seconds"].items())
        lines += ["", f"### One epoch of {estimate['rows']:,} training rows (estimate)", "",
                  f"{per} ({estimate['basis']}; mean row {estimate['mean_row_tokens']:.0f} tokens)."]
    failures = [(n, e) for n, e in parts.items() if e.get("status") != "ok"]
    if failures:
        lines += ["", "### Parts that did not run to the end", ""]
        lines += [f"- `{n}`: {e.get('error') or e.get('reason')}" for n, e in failures]
    lines += ["", MARK_END, ""]
    return "\n".join(lines)


def _goals(job: dict[str, Any] | None, trl: dict[str, Any] | None, gen: dict[str, Any] | None) -> list[str]:
    """The targets set for a GPU run, each with what was measured and whether it was met."""
    rows = []  # (goal, measured, met)
    if job and trl:
        speed = job["real_tokens_per_s"] / trl["real_tokens_per_s"]
        rows.append(("job vs plain trl: real tokens/s >= 1.5x", f"{speed:.2f}x", speed >= 1.5))
        if job["peak_memory_bytes"] and trl["peak_memory_bytes"]:
            memory = job["peak_memory_bytes"] / trl["peak_memory_bytes"]
            rows.append(("job vs plain trl: peak memory <= 0.6x", f"{memory:.2f}x", memory <= 0.6))
    if job and job.get("mfu") is not None:
        rows.append(("job MFU 35-40% (HF + FlashAttention QLoRA: ~20%)", f"{job['mfu']:.1%}", job["mfu"] >= 0.35))
    if gen:
        rows.append(("batched generation >= 10x one at a time, same predictions",
                     f"{gen['speedup']:.1f}x, {gen['identical']}/{gen['rows']} identical",
                     gen["speedup"] >= 10 and gen["identical"] == gen["rows"]))
    if not rows:
        return []
    return ["", "### Against the goals", "", "| goal | measured | met |", "|---|---|---|",
            *(f"| {goal} | {measured} | {'yes' if met else 'no'} |" for goal, measured, met in rows)]


def _status(parts: dict[str, Any], name: str) -> str:
    entry = parts.get(name) or {}
    return f"{entry.get('status', 'not run')}: {entry.get('error') or entry.get('reason') or ''}".strip()


def splice_section(section: str, benchmarks: Path) -> None:
    """Put `section` into BENCHMARKS.md between the gpu-check markers, replacing an earlier one, else at the end."""
    text = benchmarks.read_text() if benchmarks.is_file() else ""
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1].lstrip("\n")
        text = head + section.strip() + "\n" + tail
    else:
        text = text.rstrip() + "\n\n" + section.strip() + "\n"
    benchmarks.write_text(text)


def kept_section(text: str) -> str | None:
    """The gpu-check section of a BENCHMARKS.md text, for `make bench` to carry over when it rewrites the file."""
    if MARK_BEGIN not in text or MARK_END not in text:
        return None
    return MARK_BEGIN + text.split(MARK_BEGIN, 1)[1].split(MARK_END, 1)[0] + MARK_END + "\n"
