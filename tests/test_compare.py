"""`finetune compare`: a side-by-side table read from run manifests (local and s3://): config differences, training
figures from the run's log, accuracies with intervals where the metrics have them, "-" where they do not."""

from __future__ import annotations

import json
from pathlib import Path

from after_fixtures import one_line_error
from cli_runner import run_cli

from job.after.compare import comparison_rows, load_run
from job.config import load_config
from job.errors import EXIT_MISSING_INPUT, EXIT_USAGE
from job.storage.publish import build_manifest


def _fake_run(root: Path, run_id: str, lora_r: int, metrics: dict, log: list[dict]) -> Path:
    run = root / run_id
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    config = load_config("gemma-2b-it-lora", [f"method.lora_r={lora_r}", f"output.uri={root}",
                                              f"output.run_id={run_id}"], environ={}).model_dump(mode="json")
    manifest = build_manifest(run, config=config, status="completed", started_at="2026-12-01T10:00:00+00:00",
                              ended_at="2026-12-01T11:00:00+00:00", metrics=metrics)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _runs(root: Path) -> tuple[Path, Path]:
    new = _fake_run(root, "new", 32, {"tuned": {
        "execution_accuracy": 0.42, "execution_accuracy_single_db": 0.5, "valid_sql_rate": 0.9, "n_scored": 480,
        "ci95": {"execution_accuracy": [0.38, 0.46], "execution_accuracy_single_db": [0.45, 0.55]}}}, [
        {"step": 10, "elapsed_s": 60.0, "tokens_per_s": 1000.0},
        {"step": 20, "elapsed_s": 150.0, "tokens_per_s": 2000.0},
    ])
    old = _fake_run(root, "old", 16, {"tuned": {"execution_accuracy": 0.3, "n_scored": 480}}, [])
    return new, old


def test_rows_show_differences_training_and_intervals(tmp_path):
    new, old = _runs(tmp_path)
    rows = dict(comparison_rows([load_run(str(new)), load_run(str(old))]))
    assert rows["method.lora_r"] == ["32", "16"]
    assert not any(key.startswith("output.") for key in rows)  # where a run went is not a difference
    assert "model.name" not in rows  # same in both
    assert rows["steps"] == ["20", "-"] and rows["train time"] == ["2.5 min", "-"] and rows["tokens/s"] == ["1500", "-"]
    assert rows["test-suite accuracy (tuned)"] == ["42.0% [38.0%, 46.0%]", "30.0%"]
    assert rows["single-db accuracy (tuned)"] == ["50.0% [45.0%, 55.0%]", "-"]
    assert rows["test-suite accuracy (base)"] == ["-", "-"] and rows["valid SQL (tuned)"] == ["90.0%", "-"]


def test_compare_prints_and_writes_local_and_s3_runs(capsys, tmp_path, lora_run, s3_bucket, s3_client):
    new, _ = _runs(tmp_path / "runs")
    for path in new.rglob("*"):
        if path.is_file():
            s3_client.upload_file(str(path), s3_bucket, f"runs/new/{path.relative_to(new).as_posix()}")
    out = tmp_path / "table.md"
    code, stdout, stderr = run_cli(capsys, "compare", str(lora_run), f"s3://{s3_bucket}/runs/new", "--output", str(out))
    assert code == 0, stderr
    table = out.read_text()
    assert stdout.startswith(table) and f"wrote {out}" in stdout
    header, _, *lines = table.splitlines()
    assert header == "| | r1 | new |"
    by_label = {line.split(" | ")[0].lstrip("| "): line for line in lines}
    assert "| 42.0% [38.0%, 46.0%] |" in by_label["test-suite accuracy (tuned)"]
    assert by_label["steps"] == "| steps | 30 | 20 |"  # the real run's log, the bucket run's log
    assert "data.source" in by_label and "model.name" in by_label


def test_bad_input_is_one_line_and_keeps_the_existing_table(capsys, tmp_path):
    new, old = _runs(tmp_path)
    out = tmp_path / "table.md"
    out.write_text("keep")
    code, _, stderr = run_cli(capsys, "compare", str(new), str(old), "--output", str(out))
    one_line_error(code, stderr, EXIT_USAGE, "already exists")
    assert out.read_text() == "keep"
    code, _, stderr = run_cli(capsys, "compare", str(new), str(tmp_path / "missing"), "--output", str(out),
                              "--overwrite")
    one_line_error(code, stderr, EXIT_USAGE, "missing: no such file or folder")  # a local path typed: exit 2
    (tmp_path / "unfinished").mkdir()
    code, _, stderr = run_cli(capsys, "compare", str(new), str(tmp_path / "unfinished"), "--output", str(out),
                              "--overwrite")
    one_line_error(code, stderr, EXIT_MISSING_INPUT, "no manifest.json")
    (old / "manifest.json").write_text("{broken")  # a corrupt input: exit 3
    code, _, stderr = run_cli(capsys, "compare", str(new), str(old), "--output", str(out), "--overwrite")
    one_line_error(code, stderr, EXIT_MISSING_INPUT, "manifest.json: not valid JSON (line 1")
    assert out.read_text() == "keep"
    code, _, stderr = run_cli(capsys, "compare", "--output", str(out))
    assert code == EXIT_USAGE and "Missing argument" in stderr


def test_accuracy_cells_read_the_intervals_the_scorer_writes(sample_path):
    from job.after.compare import accuracy_cell
    from job.evaluation.scoring import score_predictions

    rows = [json.loads(line) for line in sample_path.read_text().splitlines()[:20]]
    metrics, _ = score_predictions(rows, [{"id": row["id"], "sql": row["sql"]} for row in rows])
    low, high = metrics["ci95"]["execution_accuracy_single_db"]
    cell = accuracy_cell(metrics, "execution_accuracy_single_db")
    assert cell == f"{metrics['execution_accuracy_single_db']:.1%} [{low:.1%}, {high:.1%}]"
