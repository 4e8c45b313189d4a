"""Bad bytes and bad files: one line naming the file, the line and the cause, with the documented exit code;
broken lines of training data are dropped and counted like other bad rows unless `data.strict` is on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from after_fixtures import one_line_error
from cli_runner import run_cli, sets

from job.errors import EXIT_MISSING_INPUT, EXIT_USAGE

BROKEN = {  # line appended to 40 good rows -> (drop reason, the cause named in the error)
    "not utf-8": (b'{"id": 1, "sql_prompt": "caf\xe9", "sql_context": "c", "sql": "s"}', "not_utf8",
                  "not UTF-8 (byte 0xe9 at column 29)"),
    "not json": (b'{"id": 2, "sql_prompt": "q", "sql_context": "c" "sql": "s"}', "not_json",
                 "not JSON (Expecting ',' delimiter at column 49)"),
    "not an object": (b'["q", "c", "s"]', "not_an_object", "expected a JSON object, got list"),
    "lone surrogate": (b'{"id": 3, "sql_prompt": "\\ud800", "sql_context": "c", "sql": "s"}', "not_utf8",
                       "holds an escaped lone surrogate"),
}


@pytest.fixture
def rows(sample_path: Path) -> list[bytes]:
    return sample_path.read_bytes().splitlines(keepends=True)[:40]


def _prepare(capsys, tiny_model, source: Path, out: Path, *extra: str):
    return run_cli(capsys, "prepare", *sets(f"model.name={tiny_model}", f"data.source={source}",
                                            "data.max_eval_rows=4", *extra), "--output", str(out))


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_training_line_is_dropped_and_counted_or_fails_with_data_strict(capsys, caplog, tmp_path,
                                                                               tiny_model, rows, case):
    line, reason, cause = BROKEN[case]
    source = tmp_path / "rows.jsonl"
    source.write_bytes(b"".join(rows[:20]) + line + b"\n" + b"".join(rows[20:]))
    code, out, err = _prepare(capsys, tiny_model, source, tmp_path / "prepared")
    assert code == 0, err
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())["splits"]["train"]
    assert stats["loaded"] == 41 and stats["dropped"][reason] == 1
    assert stats["loaded"] == stats["kept"] + sum(stats["dropped"].values())
    assert f"{reason} 1" in out  # counted in the summary
    assert f"rows.jsonl:21: {cause}" in caplog.text and "dropping such lines" in caplog.text  # named in the log

    code, out, err = _prepare(capsys, tiny_model, source, tmp_path / "strict", "data.strict=true")
    one_line_error(code, err, EXIT_MISSING_INPUT, f"data.source {source}:21: {cause}")
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xef\xbb\xbf\n"], ids=["empty", "blank", "bom"])
def test_an_empty_data_file_is_one_line(capsys, tmp_path, tiny_model, content):
    source = tmp_path / "rows.jsonl"
    source.write_bytes(content)
    code, _, err = _prepare(capsys, tiny_model, source, tmp_path / "prepared")
    one_line_error(code, err, EXIT_MISSING_INPUT, f"data.source {source}: empty file (no rows)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


@pytest.mark.parametrize(
    ("name", "content", "cause"),
    [("rows.csv", b"id,sql_prompt,sql_context,sql\n1,q,c,s\n2,caf\xe9,c,s\n", "rows.csv:3: not UTF-8 (byte 0xe9)"),
     ("rows.parquet", b"PAR1 not parquet", "cannot read as parquet: ArrowInvalid: Parquet magic bytes not found")],
)
def test_a_corrupt_csv_or_parquet_file_is_one_line(tmp_path, tiny_model, name, content, cause):
    """As a user runs it (a subprocess: datasets' own error log goes to the real stderr)."""
    source = tmp_path / name
    source.write_bytes(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_") or k == "FINETUNE_CACHE_DIR"}
    result = subprocess.run(
        [sys.executable, "-m", "job", "prepare", *sets(f"model.name={tiny_model}", f"data.source={source}"),
         "--output", str(tmp_path / "prepared")], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == EXIT_MISSING_INPUT, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and cause in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "prepared").exists()


def test_a_json_array_file_and_a_bom_are_read(capsys, tmp_path, tiny_model, rows):
    source = tmp_path / "rows.json"
    source.write_text(json.dumps([json.loads(r) for r in rows]))
    code, _, err = _prepare(capsys, tiny_model, source, tmp_path / "a")
    assert code == 0, err
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b"".join(rows))
    code, _, err = _prepare(capsys, tiny_model, bom, tmp_path / "b")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "stats.json").read_text())["splits"]["train"]["dropped"].get("not_json") is None


def _predictions(tmp_path: Path, sample_path: Path, *lines: bytes) -> Path:
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _score(capsys, tmp_path: Path, sample_path: Path, predictions: Path, *args: str):
    return run_cli(capsys, "score", "--predictions", str(predictions), "--rows", str(sample_path),
                   "--output", str(tmp_path / "scored"), *sets("evaluation.test_suite_size=0"), *args)


@pytest.mark.parametrize(
    ("lines", "cause"),
    [
        ([b'{"id": 5097, "sql": "SELECT 1"}', b'{"id": 5098, "sql": "SELECT \xff"}'], ":2: not UTF-8 (byte 0xff"),
        ([b'{"id": 5097, "sql": "SELECT 1"', b'{"id": 1}'], ":1: not JSON (Expecting ',' delimiter at column 31)"),
        ([b'{"id": 5097, "sql": 3}'], ':1: expected {"id": ..., "sql": "..."}'),
        ([b'{"id": 5097, "sql": "SELECT 1"}', b"", b'{"id": "5097", "sql": "SELECT 2"}'],
         ":3: a second prediction for id '5097' (the first is on line 1)"),
        ([b"", b"  "], ": no predictions (the file is empty)"),
    ],
    ids=["not-utf8", "not-json", "bad-record", "duplicate-id", "empty"],
)
def test_a_bad_predictions_file_is_one_line_exit_3(capsys, tmp_path, sample_path, lines, cause):
    predictions = _predictions(tmp_path, sample_path, *lines)
    code, out, err = _score(capsys, tmp_path, sample_path, predictions)
    one_line_error(code, err, EXIT_MISSING_INPUT, f"--predictions {predictions}{cause}")
    assert out == "" and not (tmp_path / "scored").exists()


def test_missing_local_inputs_are_usage_errors_everywhere(capsys, tmp_path, sample_path, tiny_model):
    """One rule: a local path the user typed that does not exist is exit 2, whatever option names it."""
    missing = str(tmp_path / "missing.jsonl")
    predictions = _predictions(tmp_path, sample_path, b'{"id": 5097, "sql": "SELECT 1"}')
    commands = [
        ["score", "--predictions", missing],
        ["score", "--predictions", str(predictions), "--rows", missing],
        ["evaluate", "--base-only", "--rows", missing, "--output", str(tmp_path / "e")],
        ["evaluate", "--run", missing, "--output", str(tmp_path / "e")],
        ["prepare", *sets(f"data.source={missing}", f"model.name={tiny_model}")],
        ["artifacts", "ls", missing],
        ["artifacts", "pull", missing, str(tmp_path / "p")],
        ["artifacts", "push", missing, str(tmp_path / "p")],
        ["export", missing, "--output", str(tmp_path / "x")],
        ["compare", missing, "--output", str(tmp_path / "c.md")],
        ["ask", "--run", missing, "--schema", missing, "q"],
    ]
    for args in commands:
        code, out, err = run_cli(capsys, *args)
        one_line_error(code, err, EXIT_USAGE, missing)
        assert "no such file" in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]


def test_a_rows_file_is_read_strictly(capsys, tmp_path, sample_path, rows):
    """--rows names the evaluation rows themselves: a dropped line would shrink the evaluation, so it fails."""
    source = tmp_path / "rows.jsonl"
    source.write_bytes(b"".join(rows[:3]) + b"{broken\n" + b"".join(rows[3:]))
    predictions = _predictions(tmp_path, sample_path, b'{"id": 5097, "sql": "SELECT 1"}')
    code, out, err = run_cli(capsys, "score", "--predictions", str(predictions), "--rows", str(source))
    one_line_error(code, err, EXIT_MISSING_INPUT, f"--rows {source}:4: not JSON (Expecting property name")
    assert out == ""
