"""benchmarks/gpu_check.py and helpers: the CPU smoke run yields every part; a failing part does not stop the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import CHATML_TEMPLATE, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_measure  # noqa: E402
import gpu_report  # noqa: E402

INJECTED = "qlora_job_packed"  # padding-free packing has its own test in test_train.py


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, str]:
    """One `--cpu-smoke` run of every part, with one part made to fail on purpose."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    build_tokenizer(CHATML_TEMPLATE).save_pretrained(tmp / "tokenizer")  # ChatML has a system role, like SmolLM2
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp / "out"),
         "--tokenizer", str(tmp / "tokenizer"), "--peak-tflops", "1", "--fail", INJECTED],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    report = json.loads((tmp / "out" / "gpu.json").read_text())
    return done, report, (tmp / "out" / "gpu_check.md").read_text()


def test_every_part_is_recorded_and_a_failure_does_not_stop_the_rest(smoke):
    done, report, _ = smoke
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS), done.stderr[-3000:]
    assert done.returncode == 1  # a part failed
    failed = parts[INJECTED]
    assert failed["status"] == "failed" and "injected failure" in failed["error"] and "Traceback" in failed["traceback"]
    not_ok = {name: entry.get("error") for name, entry in parts.items() if entry["status"] != "ok"}
    assert list(not_ok) == [INJECTED], not_ok
    assert report["mode"] == "cpu-smoke" and report["wall_s"] > 0


def test_training_figures_are_positive_and_record_what_ran(smoke):
    _, report, _ = smoke
    parts = report["parts"]
    for name in ("qlora_job", "qlora_trl_defaults", "lora_job"):
        result = parts[name]["result"]
        assert result["real_tokens_per_s"] > 0 and result["timed_real_tokens"] > 0 and result["timed_seconds"] > 0
        assert result["peak_memory_bytes"] > 0 and 0 < result["mfu"] < 1 and result["flops_per_token"] > 0
        assert 0 < result["non_padding_share"] <= 1 and result["epoch_100k_rows_s"] > 0
        assert result["timed_steps"] == report["plan"]["timed_steps"]
        # the timed window excludes the warmup steps' tokens
        assert result["timed_real_tokens"] < result["all_real_tokens"]
    job, trl, lora = (parts[n]["result"]["settings"] for n in ("qlora_job", "qlora_trl_defaults", "lora_job"))
    assert job["load_in_4bit"] and job["bnb_4bit_quant_type"] == "nf4" and job["bnb_4bit_use_double_quant"]
    assert job["gradient_checkpointing"] and job["trainable_parameters"] > 0
    assert trl["load_in_4bit"] and not lora["load_in_4bit"]
    # the job's own token counter saw at least the tokens the clock attributes to the trained steps
    assert parts["qlora_job"]["result"]["job_real_tokens"] >= parts["qlora_job"]["result"]["all_real_tokens"]
    estimate = parts["epoch_estimate"]["result"]["seconds"]
    assert set(estimate) == {"qlora_job", "qlora_trl_defaults", "lora_job"} and min(estimate.values()) > 0


def test_generation_and_subprocess_parts(smoke):
    _, report, markdown = smoke
    gen = report["parts"]["generation"]["result"]
    assert gen["batched"]["rows_per_s"] > 0 and gen["one_at_a_time"]["rows_per_s"] > 0
    assert 0 <= gen["identical"] <= gen["rows"] and gen["speedup"] > 0
    assert report["parts"]["torchrun"]["result"]["steps"] == [1, 2]
    pre = report["parts"]["preemption"]["result"]
    assert pre["exit_code_after_sigterm"] == 75 and pre["stopped_at_step"] < pre["max_steps"]
    assert not pre["traceback_printed"]
    env = report["parts"]["environment"]["result"]
    assert env["versions"]["torch"] and env["versions"]["trl"] and env["unmet_requirements"] == []
    assert markdown.startswith(gpu_report.MARK_BEGIN) and gpu_report.MARK_END in markdown
    assert f"`{INJECTED}`: RuntimeError: injected failure" in markdown and "plain trl" in markdown


def test_flop_formula_and_gemma_2b_dimensions():
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    with torch.device("meta"):
        model = GemmaForCausalLM(GemmaConfig(**gpu_check.GEMMA_COMMON, **gpu_check.GEMMA_2B))
    n = model.num_parameters()
    assert n == 2_506_172_416  # google/gemma-2b's published parameter count
    dims = gpu_check.GEMMA_2B
    assert gpu_measure.model_flops_per_token(n, dims, 200) == 6 * n + 12 * 18 * 8 * 256 * 200
    assert gpu_measure.model_flops_per_token(n, dims, 400) > gpu_measure.model_flops_per_token(n, dims, 200)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.5), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0),
    ("Tesla T4", None),
])
def test_bf16_peak_table_matches_the_most_specific_name(name, peak):
    assert gpu_measure.bf16_peak_tflops(name) == peak


def test_steady_state_excludes_warmup_steps():
    clock = gpu_measure.StepClock()
    clock.start = 0.0
    clock.step_end_times = [10.0, 11.0, 12.0, 13.0]  # a slow first step
    clock.batch_tokens = [5, 5, 100, 100, 100, 100, 100, 100]  # two micro-batches a step
    clock.batch_shapes = [8, 8, 100, 100, 100, 100, 125, 125]
    steady = clock.steady(warmup_steps=1, accumulation=2)
    assert steady["timed_steps"] == 3 and steady["timed_seconds"] == 3.0 and steady["timed_real_tokens"] == 600
    assert steady["real_tokens_per_s"] == 200.0 and steady["non_padding_share"] == 600 / 650
    with pytest.raises(gpu_measure.PartFailed):
        clock.steady(warmup_steps=4, accumulation=2)


def test_section_is_spliced_into_benchmarks_and_replaced_not_duplicated(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nCPU figures.\n")
    section = f"{gpu_report.MARK_BEGIN}\n## GPU check: one\n{gpu_report.MARK_END}\n"
    gpu_report.splice_section(section, bench)
    gpu_report.splice_section(section.replace("one", "two"), bench)
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n\nCPU figures.\n") and text.count(gpu_report.MARK_BEGIN) == 1
    assert "GPU check: two" in text and "GPU check: one" not in text
    assert gpu_report.kept_section(text).strip() == section.replace("one", "two").strip()
    assert gpu_report.kept_section("# Benchmarks\n") is None


def test_kit_keeps_only_the_target_cuda_library_of_bitsandbytes(tmp_path):
    import zipfile

    import gpu_kit

    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", *(f"bitsandbytes/libbitsandbytes_{x}.so" for x in (
        "cpu", "cuda126", "cuda130", "rocm72"))]
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, b"x" * 1000)
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(f"{n},sha256=a,1000" for n in names))
    before, after = gpu_kit.slim_bitsandbytes(wheel, {"130"})
    assert after < before
    with zipfile.ZipFile(wheel) as archive:
        kept = set(archive.namelist())
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == {names[0], names[1], names[3], "bitsandbytes-0.50.2.dist-info/RECORD"}
    assert "cuda126" not in record and "rocm72" not in record and "cuda130" in record
    with pytest.raises(SystemExit, match="no library for CUDA"):
        gpu_kit.slim_bitsandbytes(wheel, {"118"})


def test_parts_past_the_budget_or_without_a_model_are_skipped_with_a_reason(tmp_path):
    import argparse
    import time

    plan = gpu_check.Plan(**{**vars(gpu_check.CPU_PLAN), "budget_s": 10.0})
    ctx = gpu_check.Context(plan=plan, args=argparse.Namespace(fail=None), work=tmp_path)
    late = gpu_check.run_part(ctx, "environment", started=time.monotonic() - 60)
    assert late["status"] == "skipped" and "time budget" in late["reason"]
    plan.budget_s = None
    orphan = gpu_check.run_part(ctx, "lora_job", started=time.monotonic())
    assert orphan["status"] == "skipped" and "model" in orphan["reason"]
    estimate = gpu_check.run_part(ctx, "epoch_estimate", started=time.monotonic())
    assert estimate["status"] == "failed" and "no training part succeeded" in estimate["error"]
