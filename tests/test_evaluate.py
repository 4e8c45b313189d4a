"""Evaluation end to end on a tiny model and the shipped real rows: evaluate, score, and run's side-by-side report."""

from __future__ import annotations

import json

from cli_runner import run_cli, sets

from job.config import load_config
from job.data.sources import load_splits

EVAL_ROWS = ["data.max_eval_rows=6", "evaluation.max_new_tokens=8", "evaluation.batch_size=3"]


def _data(tiny_model, sample_path):
    return [f"model.name={tiny_model}", f"data.source={sample_path}", *EVAL_ROWS]


def test_evaluate_base_only_writes_predictions_and_metrics(capsys, tmp_path, tiny_model, sample_path):
    code, out, err = run_cli(
        capsys, "evaluate", "--config", "gemma-2b-it-lora", *sets(*_data(tiny_model, sample_path)),
        "--base-only", "--output", str(tmp_path),
    )
    assert code == 0, err
    predictions = [json.loads(x) for x in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6
    assert {"id", "raw", "sql", "stopped"} <= set(predictions[0])
    metrics = json.loads((tmp_path / "metrics.json").read_text())["base"]
    for key in ("n_rows", "n_gold_failed", "n_scored", "execution_accuracy", "exact_match", "normalized_match",
                "valid_sql_rate", "empty_rate", "runaway_rate", "by_complexity", "by_task_type", "by_domain"):
        assert key in metrics
    assert metrics["n_rows"] == 6
    assert "base: execution accuracy" in out
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()


def test_evaluate_needs_exactly_one_of_adapter_and_base_only(capsys, tmp_path):
    code, _, err = run_cli(capsys, "evaluate", "--output", str(tmp_path))
    assert code == 2 and "--adapter" in err
    code, _, err = run_cli(capsys, "evaluate", "--output", str(tmp_path), "--adapter", str(tmp_path), "--base-only")
    assert code == 2


def test_score_gold_predictions_is_perfect_on_rows_whose_gold_runs(capsys, tmp_path, sample_path):
    cfg = load_config("gemma-2b-it-qlora", [f"data.source={sample_path}", "data.max_eval_rows=40"], environ={})
    rows = load_splits(cfg.data).eval
    predictions = tmp_path / "gold.jsonl"
    predictions.write_text("".join(json.dumps({"id": r["id"], "sql": r["sql"]}) + "\n" for r in rows))
    code, out, err = run_cli(
        capsys, "score", "--predictions", str(predictions), *sets(f"data.source={sample_path}"),
        "--output", str(tmp_path / "scored"),
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert metrics["n_rows"] == 40 and metrics["n_scored"] == 40 - metrics["n_gold_failed"]
    assert metrics["execution_accuracy"] == 1.0 and metrics["exact_match"] == 1.0
    assert "execution accuracy (test suite) 100.0% [95% CI 100.0–100.0], single-DB 100.0%" in out

    before = (tmp_path / "scored" / "metrics.json").read_text()
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"id": r["id"], "sql": "SELECT 1"}) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "score", "--predictions", str(wrong), *sets(f"data.source={sample_path}"),
                           "--output", str(tmp_path / "scored"))
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "scored" / "metrics.json").read_text() == before  # existing results untouched


def test_score_rejects_unknown_ids_and_bad_lines(capsys, tmp_path, sample_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": -12345, "sql": "SELECT 1"}\n')
    code, _, err = run_cli(capsys, "score", "--predictions", str(bad), *sets(f"data.source={sample_path}"))
    assert code == 2 and "-12345" in err
    bad.write_text("not json\n")  # a corrupt input: exit 3, naming the line and the cause
    code, _, err = run_cli(capsys, "score", "--predictions", str(bad), *sets(f"data.source={sample_path}"))
    assert code == 3 and ":1: not JSON (Expecting value at column 1)" in err


def test_run_reports_base_and_tuned_side_by_side(capsys, tmp_path, tiny_model, sample_path):
    overrides = [
        *_data(tiny_model, sample_path), "data.max_train_rows=16", "training.max_steps=3",
        "training.per_device_batch_size=4", "training.gradient_accumulation_steps=1", "training.logging_steps=1",
        "training.learning_rate=1e-2", "training.gradient_checkpointing=false",
    ]
    code, _, err = run_cli(
        capsys, "run", "--config", "gemma-2b-it-lora", *sets(*overrides), "--output", str(tmp_path), "--run-id", "r",
    )
    assert code == 0, err
    run = tmp_path / "r"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"base", "tuned", "delta"} <= set(metrics)
    base = [json.loads(x)["id"] for x in (run / "eval" / "base" / "predictions.jsonl").read_text().splitlines()]
    tuned = [json.loads(x)["id"] for x in (run / "eval" / "tuned" / "predictions.jsonl").read_text().splitlines()]
    assert base == tuned and len(base) == 6  # the same rows
    report = (run / "eval" / "report.md").read_text()
    assert "base" in report.lower() and "tuned" in report.lower()
    html = (run / "eval" / "report.html").read_text()
    assert "data:image/png;base64" in html
    card = (run / "adapter" / "README.md").read_text()
    assert "Not evaluated yet" not in card and "xecution" in card
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["tuned"]["n_rows"] == 6
    paths = {f["path"] for f in manifest["files"]}
    assert {"config.yaml", "adapter/adapter_config.json", "eval/report.html", "logs/train_log.jsonl"} <= paths
    assert "base: execution accuracy" in err and "tuned: execution accuracy" in err

    code, _, err = run_cli(
        capsys, "evaluate", "--config", "gemma-2b-it-lora", *sets(*_data(tiny_model, sample_path)),
        "--adapter", str(run / "adapter"), "--output", str(tmp_path / "again"),
    )
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["tuned"]
    assert again["execution_accuracy"] == metrics["tuned"]["execution_accuracy"]  # greedy: reproducible
