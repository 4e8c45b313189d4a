"""Session fixtures for the after-training commands: short real rows, a base whose generation_config stops only at
EOS (like google/gemma-2b-it's), and tiny LoRA / QLoRA runs trained on it once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import build_model_dir

FAST_TRAIN = [
    "data.max_train_rows=4", "data.max_eval_rows=1", "data.eval_fraction=0.2", "training.per_device_batch_size=4",
    "training.gradient_accumulation_steps=1", "training.learning_rate=1e-2", "training.warmup_ratio=0",
    "training.lr_scheduler=constant", "training.logging_steps=5", "training.save_steps=1000",
    "training.gradient_checkpointing=false", "training.report_to=none", "evaluation.max_new_tokens=48",
    "evaluation.compare_base=false",
]


@pytest.fixture(scope="session")
def short_rows(tmp_path_factory: pytest.TempPathFactory, sample_path: Path) -> Path:
    """The 5 shortest real rows, so a few steps teach a tiny model to answer and stop."""
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()]
    rows.sort(key=lambda r: len(r["sql_context"]) + len(r["sql_prompt"]) + len(r["sql"]))
    path = tmp_path_factory.mktemp("short") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    return path


@pytest.fixture(scope="session")
def eos_only_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma with a generation_config that stops at <eos> only, so stopping at <end_of_turn> after an
    export can only come from the exported generation_config.json."""
    path = build_model_dir(tmp_path_factory.mktemp("tiny-eos-only"))
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = config["eos_token_id"][0]
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def _train_run(root: Path, preset: str, base: Path, rows: Path, steps: int, evaluate: bool) -> Path:
    from job.config import load_config
    from job.pipeline import run_pipeline

    with pytest.MonkeyPatch.context() as patch:  # session fixtures run before the per-test isolated environment
        patch.setenv("FINETUNE_CACHE_DIR", str(root / "cache"))
        cfg = load_config(preset, [f"model.name={base}", f"data.source={rows}", f"output.uri={root / 'runs'}",
                                   "output.run_id=r1",
                                   f"training.max_steps={steps}", *FAST_TRAIN], environ={})
        run_pipeline(cfg, resume="never", overwrite=False, evaluate=evaluate)
    return root / "runs" / "r1"


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory, eos_only_base: Path, short_rows: Path) -> Path:
    """A finished, evaluated LoRA run whose model answers its training rows and stops."""
    return _train_run(tmp_path_factory.mktemp("lora-run"), "gemma-2b-it-lora", eos_only_base, short_rows, 30, True)


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, eos_only_base: Path, short_rows: Path) -> Path:
    """A finished QLoRA (4-bit NF4 base) run, trained a few steps, not evaluated."""
    return _train_run(tmp_path_factory.mktemp("qlora-run"), "gemma-2b-it-qlora", eos_only_base, short_rows, 4, False)


def train_rows(run: Path) -> list[dict]:
    """The run's training rows (its short source minus the held-out ids)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    held_out = {str(i) for i in json.loads((run / "data" / "eval_ids.json").read_text())}
    rows = [json.loads(line) for line in Path(cfg["data"]["source"]).read_text().splitlines()]
    return [r for r in rows if str(r["id"]) not in held_out]


def one_line_error(code: int, stderr: str, expected_code: int, text: str) -> None:
    assert code == expected_code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0] and "Traceback" not in stderr
