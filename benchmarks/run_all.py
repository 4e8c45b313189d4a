"""`make bench`: every figure measured against its baseline in the same run, written to BENCHMARKS.md.

Usage: python benchmarks/run_all.py [--reuse-demo] [--only=quality,gemma,training,eval,startup,scoring]

1. Quality: SmolLM2-135M-Instruct before vs after fine-tuning (the demo run), execution accuracy and runaway rate;
   the Gemma 3 270M demo preset on the same held-out rows, with wall time and peak memory of each run (`gemma`).
2. Training: tokens/s and peak memory, the job's trainer vs a plain trl `SFTTrainer` (benchmarks/bench_training.py).
3. Evaluation speed: the job's batched generation vs one-at-a-time `generate`, predictions checked identical.
4. Start-up and data: `finetune --help` vs importing torch+transformers; the data stage vs a naive tokenization.
5. Scoring: the test-suite scorer vs the single-database scorer on the shipped rows (bench_scoring.py).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench"
PRESET = "smollm2-135m-cpu-demo"
GEMMA_PRESET = "gemma3-270m-cpu-demo"
TRAIN_STEPS = 6
EVAL_SPEED_ROWS = 24


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, check=True, text=True, **kwargs)


def _config(*overrides: str) -> Any:
    from job.config import load_config

    return load_config(PRESET, list(overrides), environ={})


def quality(reuse: bool, preset: str = PRESET, folder: str = "demo") -> dict[str, Any]:
    """A demo run, end to end, through the real CLI (`--reuse-demo` keeps a finished one), with its wall time and
    peak RSS (the largest of the CLI and the processes it waited for, from wait4: this parent is small when it
    forks, so the figure is the run's own)."""
    out = WORK / folder
    run = out / "demo"
    if reuse and (run / "manifest.json").is_file() and (out / "peak_rss.json").is_file():
        manifest = json.loads((run / "manifest.json").read_text())
        started, ended = (datetime.fromisoformat(manifest[k]) for k in ("started_at", "ended_at"))
        return {"preset": preset, "metrics": manifest["metrics"], "wall_s": (ended - started).total_seconds(),
                "adapter": str(run / "adapter"), **json.loads((out / "peak_rss.json").read_text())}
    start = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "job", "run", "--config", preset, "--output", str(out),
                              "--overwrite", "--run-id", "demo"], cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    peak = {"peak_rss_gib": usage.ru_maxrss / 2**20, "eval_ids": json.loads((run / "data" / "eval_ids.json").read_text())}
    (out / "peak_rss.json").write_text(json.dumps(peak))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    return {"preset": preset, "metrics": metrics, "wall_s": time.monotonic() - start, "adapter": str(run / "adapter"),
            **peak}


def training_efficiency() -> dict[str, Any]:
    """The job's trainer vs a plain trl `SFTTrainer` (defaults), demo model and Gemma-vocabulary model, same rows,
    batch and steps, each case in its own process: tokens/s and peak RSS (benchmarks/bench_training.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_training

    return {"steps": TRAIN_STEPS, "cases": bench_training.measure(["demo", "gemma256k"], TRAIN_STEPS)}


def evaluation_speed(adapter: str) -> dict[str, Any]:
    """Rows/s of batched generation vs one row at a time, on the tuned demo model; outputs must be identical."""
    from peft import PeftModel

    from job.data.sources import load_splits
    from job.evaluation.generate import generate_predictions
    from job.train.model import load_base_model, load_tokenizer, resolve_model_path

    cfg = _config()
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, adapter)
    model = PeftModel.from_pretrained(load_base_model(cfg.model, path), adapter)
    rows = load_splits(cfg.data).eval[:EVAL_SPEED_ROWS]
    figures = {}
    outputs = {}
    for name, batch_size in (("batched", cfg.evaluation.batch_size), ("one_at_a_time", 1)):
        start = time.monotonic()
        outputs[name] = generate_predictions(model, tokenizer, rows, batch_size=batch_size,
                                             max_new_tokens=cfg.evaluation.max_new_tokens, label=name)
        figures[name] = {"rows_per_s": len(rows) / (time.monotonic() - start), "batch_size": batch_size}
    same = [a["raw"] == b["raw"] for a, b in zip(outputs["batched"], outputs["one_at_a_time"], strict=True)]
    return {"rows": len(rows), **figures, "identical": sum(same), "max_new_tokens": cfg.evaluation.max_new_tokens}


def _median_seconds(func: Any, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.monotonic()
        func()
        times.append(time.monotonic() - start)
    return statistics.median(times)


def startup_and_data() -> dict[str, Any]:
    def wall(args: list[str], repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            start = time.monotonic()
            _run(args, capture_output=True)
            times.append(time.monotonic() - start)
        return statistics.median(times)

    finetune = str(Path(sys.executable).parent / "finetune")
    help_s = wall([finetune, "--help"])
    heavy_s = wall([sys.executable, "-c", "import torch, transformers, trl, peft"])

    import datasets

    from job.data.prepare import prepare
    from job.train.model import load_tokenizer, resolve_model_path

    cfg = _config("data.max_eval_rows=1")
    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model.name))
    prepare(cfg, tokenizer)  # warm the datasets cache: both sides below read the same parsed file
    n_rows = prepare(cfg, tokenizer).stats["splits"]["train"]["loaded"]
    rows = datasets.load_dataset("json", data_files=cfg.data.source)["train"]

    def naive() -> None:
        rows.map(lambda r: {"ids": tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{r['sql_context']}\n{r['sql_prompt']}"},
             {"role": "assistant", "content": r["sql"]}], tokenize=True)}, load_from_cache_file=False)

    job_s = _median_seconds(lambda: prepare(cfg, tokenizer))
    naive_s = _median_seconds(naive)
    return {"help_s": help_s, "import_heavy_s": heavy_s, "rows": n_rows, "job_rows_per_s": n_rows / job_s,
            "naive_rows_per_s": n_rows / naive_s}


def _versions() -> str:
    names = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")
    return ", ".join(f"{n} {metadata.version(n)}" for n in names)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _pp(x: float) -> str:
    return f"{x * 100:+.1f} pp"


def _ci(m: dict, key: str) -> str:
    low_high = (m.get("ci95") or {}).get(key)
    return f" [{low_high[0]:.1%}–{low_high[1]:.1%}]" if low_high else ""


def _p(tuned: dict, key: str) -> str:
    paired = ((tuned.get("vs_base") or {}).get(key)) or {}
    return f" (McNemar p = {paired['p_value']:.2g})" if paired.get("p_value") is not None else ""


def _noise(tuned: dict) -> str:
    """The paired test in words and the test suite's power (from the evaluation's metrics)."""
    from job.evaluation.report import noise_statements, suite_statement

    return "\n\n".join([*noise_statements({"tuned": tuned}), suite_statement(tuned)])


def _training_table(t: dict) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_training

    return bench_training.markdown(t["cases"])


def _demo_models_table(q: dict, g: dict) -> str:
    """SmolLM2 vs Gemma 3 270M demo runs on the same held-out rows: accuracy with intervals, time, memory."""
    same = q.get("eval_ids") == g.get("eval_ids")
    lines = [
        "| preset | base EX, test suite (95% CI) | tuned EX, test suite (95% CI) | tuned vs base | tuned EX, single DB | "
        "valid SQL base / tuned | runaway base / tuned | whole run | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in (q, g):
        base, tuned = run["metrics"]["base"], run["metrics"]["tuned"]
        lines.append(
            f"| `{run['preset']}` | {_pct(base['execution_accuracy'])}{_ci(base, 'execution_accuracy')} "
            f"| {_pct(tuned['execution_accuracy'])}{_ci(tuned, 'execution_accuracy')} "
            f"| {_pp(tuned['execution_accuracy'] - base['execution_accuracy'])}{_p(tuned, 'execution_accuracy')} "
            f"| {_pct(tuned['execution_accuracy_single_db'])} "
            f"| {_pct(base['valid_sql_rate'])} / {_pct(tuned['valid_sql_rate'])} "
            f"| {_pct(base.get('runaway_rate'))} / {_pct(tuned.get('runaway_rate'))} "
            f"| {run['wall_s'] / 60:.1f} min | {run['peak_rss_gib']:.2f} GiB |"
        )
    rows = g["metrics"]["tuned"]["n_rows"]
    return "\n".join([
        f"Both presets train on the same rows and are evaluated on the same {rows} held-out rows "
        f"({'identical' if same else 'NOT identical'} `data/eval_ids.json`), each run through `finetune run` in its "
        "own process (whole run: load, train, evaluate base and tuned, publish; peak RSS: the largest process).",
        "",
        *lines,
    ])


DEMO_BUDGET_MIN, DEMO_BUDGET_GIB = 20.0, 4.0
"""`make demo` on a fresh machine (install included) must fit these on 2 cores for a preset to be its default."""
INSTALL_MIN = 3.1
"""`make install` on a fresh 2-core machine with nothing in pip's cache (measured separately: 3 min 06 s), added
to a run's time; the one-time GGUF conversion is not in the runs here (cached), see the section's text."""


def _makefile_demo() -> str:
    text = (ROOT / "Makefile").read_text()
    return next(line.split("?=", 1)[1].strip() for line in text.splitlines() if line.startswith("DEMO "))


def _gemma_section(q: dict, g: dict | None) -> str:
    if not g:
        return ""
    fresh_min = g["wall_s"] / 60 + INSTALL_MIN
    fits = fresh_min <= DEMO_BUDGET_MIN and g["peak_rss_gib"] <= DEMO_BUDGET_GIB
    default = _makefile_demo()
    verdict = (
        f"The Gemma demo fits the `make demo` budget ({DEMO_BUDGET_MIN:.0f} min with install, "
        f"{DEMO_BUDGET_GIB:.0f} GiB peak RSS): {fresh_min:.1f} min with install, {g['peak_rss_gib']:.2f} GiB."
        if fits else
        f"The Gemma demo does not fit the `make demo` budget ({DEMO_BUDGET_MIN:.0f} min with install, "
        f"{DEMO_BUDGET_GIB:.0f} GiB peak RSS): {fresh_min:.1f} min with install, {g['peak_rss_gib']:.2f} GiB peak."
    )
    from job.config import load_config

    steps = {p: load_config(p, environ={}).training for p in (PRESET, GEMMA_PRESET)}
    schedule = {p: f"{t.max_steps} steps of {t.per_device_batch_size * t.gradient_accumulation_steps} rows in "
                   f"micro-batches of {t.per_device_batch_size}" for p, t in steps.items()}
    return f"""### Demo models: SmolLM2-135M-Instruct vs Gemma 3 270M (base)

`{GEMMA_PRESET}` is Gemma 3 270M, the base model (268M parameters, 170M of them the 262,144-token embedding
that is also the LM head), with the shipped Gemma turn template (`model.chat_template: gemma`), the same LoRA
settings and rows as `{PRESET}`, and {schedule[GEMMA_PRESET]} (SmolLM2: {schedule[PRESET]}). The one-time
conversion of each .gguf to safetensors on first use (about 50 s for Gemma, 30 s for SmolLM2) is cached and not in
these times. {_demo_models_table(q, g)}

{verdict} `make demo` runs `{default}` (`make demo DEMO={GEMMA_PRESET if default == PRESET else PRESET}` runs the other).
"""


def write_markdown(q: dict, t: dict, e: dict, s: dict, path: Path, g: dict | None = None) -> None:
    base, tuned = q["metrics"]["base"], q["metrics"]["tuned"]
    cpu = platform.processor() or platform.machine()
    text = f"""# Benchmarks

Produced by `make bench` (`python benchmarks/run_all.py`) on {os.cpu_count()} CPU cores ({cpu}, no GPU),
Python {platform.python_version()}, {_versions()}. Each figure is measured against its baseline in the same run;
absolute times on a shared machine are noisy, the ratios are the point.

## 1. Quality: SmolLM2-135M-Instruct before vs after fine-tuning

Preset `{PRESET}` (LoRA r=16, {q['metrics'].get('tuned', {}).get('n_rows')} held-out real rows never trained on),
whole run {q['wall_s'] / 60:.1f} min including both evaluations.

| | base | tuned | delta |
|---|---|---|---|
| execution accuracy, test suite (of {tuned['n_scored']} rows whose gold runs; 95% CI) | {_pct(base['execution_accuracy'])}{_ci(base, 'execution_accuracy')} | {_pct(tuned['execution_accuracy'])}{_ci(tuned, 'execution_accuracy')} | {_pp(tuned['execution_accuracy'] - base['execution_accuracy'])}{_p(tuned, 'execution_accuracy')} |
| execution accuracy, single DB (95% CI) | {_pct(base.get('execution_accuracy_single_db'))}{_ci(base, 'execution_accuracy_single_db')} | {_pct(tuned.get('execution_accuracy_single_db'))}{_ci(tuned, 'execution_accuracy_single_db')} | {_pp(tuned['execution_accuracy_single_db'] - base['execution_accuracy_single_db'])}{_p(tuned, 'execution_accuracy_single_db')} |
| exact match | {_pct(base['exact_match'])} | {_pct(tuned['exact_match'])} | {_pp(tuned['exact_match'] - base['exact_match'])} |
| valid SQL | {_pct(base['valid_sql_rate'])} | {_pct(tuned['valid_sql_rate'])} | {_pp(tuned['valid_sql_rate'] - base['valid_sql_rate'])} |
| runaway (no stop within max_new_tokens) | {_pct(base.get('runaway_rate'))} | {_pct(tuned.get('runaway_rate'))} | {_pp(tuned['runaway_rate'] - base['runaway_rate'])} |

{_noise(tuned)}

{_gemma_section(q, g)}

## 2. Training: speed and peak memory, the job vs a plain trl `SFTTrainer` with default settings

`python benchmarks/bench_training.py --steps={t['steps']}`: same model, LoRA config, rows and rows per optimizer step,
{t['steps']} steps each, each case in a fresh process (peak RSS: the process's VmHWM; "added by training" is the peak
minus the RSS just before `trainer.train()`), tokens/s timed around `trainer.train()`. `demo` is SmolLM2-135M
(49k vocabulary, preset `{PRESET}`); `gemma256k` is a Gemma-architecture model with the real 256,000-token
vocabulary and two small layers, built at bench time. trl's fused LM head never builds the full logits, but on
a CPU it projects every position; the job projects only the answer tokens (20% of the demo's), pads less (rows of
similar length per batch) and, in the demo preset, runs micro-batches of 2 rows with gradient accumulation.

{_training_table(t)}

## 3. Evaluation speed: batched generation vs one row at a time

Tuned demo model, {e['rows']} held-out rows, greedy, max_new_tokens {e['max_new_tokens']}.
Predictions identical: {e['identical']} of {e['rows']}. On a CPU the gain is modest: prefilling ~210-token prompts
is compute-bound and costs the same batched or not, and a batch decodes until its longest answer ends. On a GPU,
decoding is memory-bound and batching multiplies throughput far more.

| | rows/s |
|---|---|
| one-at-a-time `generate` (baseline) | {e['one_at_a_time']['rows_per_s']:.2f} |
| batched (batch {e['batched']['batch_size']}, left padding, length-sorted) | {e['batched']['rows_per_s']:.2f} |
| ratio | {e['batched']['rows_per_s'] / e['one_at_a_time']['rows_per_s']:.2f}x |

## 4. Start-up and data

| | figure | baseline |
|---|---|---|
| `finetune --help` wall time (median of 5) | {s['help_s']:.2f} s | {s['import_heavy_s']:.2f} s to import torch+transformers+trl+peft |
| data stage on the whole shipped sample ({s['rows']} rows: load, validate, split, chat template, tokenize, stats; median of 5) | {s['job_rows_per_s']:.0f} rows/s | {s['naive_rows_per_s']:.0f} rows/s for `datasets.map(apply_chat_template)` alone |
"""
    path.write_text(text)


def main() -> None:
    """All phases; `--only training,startup` reruns those and keeps the others from runs/bench/results.json."""
    WORK.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    _run([sys.executable, "-m", "job.train.demo_model", "models"])
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--only=")), None)
    saved = WORK / "results.json"
    results = json.loads(saved.read_text()) if only and saved.is_file() else {}
    if not only or "quality" in only:
        results["quality"] = quality(reuse="--reuse-demo" in sys.argv)
    if not only or "gemma" in only:
        _run([sys.executable, "-m", "job.train.demo_model", "models", "--preset", GEMMA_PRESET])
        results["gemma"] = quality("--reuse-demo" in sys.argv, GEMMA_PRESET, "demo-gemma3")
    if not only or "training" in only:
        results["training"] = training_efficiency()
    if not only or "eval" in only:
        results["eval"] = evaluation_speed(results["quality"]["adapter"])
    if not only or "startup" in only:
        results["startup"] = startup_and_data()
    if not only or "scoring" in only:
        import bench_scoring

        results["scoring"] = bench_scoring.run()
    saved.write_text(json.dumps(results, indent=2))
    previous = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").is_file() else ""
    write_markdown(results["quality"], results["training"], results["eval"], results["startup"], ROOT / "BENCHMARKS.md",
                   results.get("gemma"))
    if "scoring" in results:
        import bench_scoring

        with (ROOT / "BENCHMARKS.md").open("a") as fh:
            fh.write("\n" + bench_scoring.markdown(results["scoring"]))
    from gpu_report import kept_section, splice_section  # the GPU figures come from `make gpu-check`: keep them

    if gpu_section := kept_section(previous):
        splice_section(gpu_section, ROOT / "BENCHMARKS.md")
    print((ROOT / "BENCHMARKS.md").read_text())


if __name__ == "__main__":
    main()
