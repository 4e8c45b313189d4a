"""`finetune ask`: the run's model answers with the evaluation's exact prompt and stop tokens; --execute runs the SQL
in the sandbox; --file answers many in batches; bad input is one line with exit 2 or 3."""

from __future__ import annotations

import json
from pathlib import Path

from after_fixtures import one_line_error, train_rows
from cli_runner import run_cli

from job.after.ask import answer, as_rows, format_table, load_model, run_in_sandbox
from job.after.source import open_run_source
from job.data.prompts import ChatFormatter
from job.errors import EXIT_MISSING_INPUT, EXIT_USAGE
from job.evaluation.generate import generate_predictions


class GenerateSpy:
    """Records what `model.generate` receives, then lets the real call happen."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.real = model.generate

    def __enter__(self):
        def spy(**kwargs):
            self.calls.append(kwargs)
            return self.real(**kwargs)

        self.model.generate = spy
        return self

    def __exit__(self, *exc):
        self.model.generate = self.real


def test_ask_sends_exactly_what_evaluation_sends(lora_run):
    model, tokenizer = load_model(open_run_source(str(lora_run)))
    row = train_rows(lora_run)[0]
    with GenerateSpy(model) as evaluation:  # what the evaluation stage does for a held-out row
        expected = generate_predictions(model, tokenizer, [row], batch_size=1, max_new_tokens=48)
    question = [{"question": row["sql_prompt"]}]
    with GenerateSpy(model) as asking:
        answers = answer(model, tokenizer, as_rows(row["sql_context"], question), execute=False,
                         max_new_tokens=48, batch_size=1)
    (sent,), (reference,) = asking.calls, evaluation.calls
    assert sent["input_ids"].tolist() == reference["input_ids"].tolist()
    assert sent["eos_token_id"] == reference["eos_token_id"] == ChatFormatter(tokenizer).stop_ids
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in sent["eos_token_id"]
    assert tokenizer.decode(sent["input_ids"][0]) == ChatFormatter(tokenizer).prompt(row)
    assert answers[0]["sql"] == expected[0]["sql"] and answers[0]["stopped"]


def test_ask_prints_sql_and_executes_it_in_the_sandbox(capsys, tmp_path, lora_run):
    row = train_rows(lora_run)[0]
    schema = tmp_path / "schema.sql"
    schema.write_text(row["sql_context"])
    code, stdout, stderr = run_cli(capsys, "ask", "--run", str(lora_run), "--schema", str(schema), row["sql_prompt"])
    assert code == 0, stderr
    assert stdout.strip() == row["sql"].strip()

    code, stdout, stderr = run_cli(capsys, "ask", "--run", str(lora_run), "--schema", str(schema), "--execute",
                                   row["sql_prompt"])
    assert code == 0, stderr
    expected = run_in_sandbox(row["sql_context"], row["sql"], 2.0, 100)
    assert "error" not in expected
    assert stdout.strip() == f"{row['sql'].strip()}\n{format_table(expected['columns'], expected['rows'])}"


def test_ask_file_answers_many_in_batches(capsys, tmp_path, lora_run):
    rows = train_rows(lora_run)[:3]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(
        json.dumps({"id": f"q{i}", "question": r["sql_prompt"], "schema": r["sql_context"]}) + "\n"
        for i, r in enumerate(rows)
    ))
    code, stdout, stderr = run_cli(capsys, "ask", "--run", str(lora_run), "--file", str(questions), "--execute",
                                   "--batch-size", "2")
    assert code == 0, stderr
    answers = [json.loads(line) for line in stdout.splitlines()]
    assert [a["id"] for a in answers] == ["q0", "q1", "q2"]
    assert sum(a["sql"].strip() == r["sql"].strip() for a, r in zip(answers, rows, strict=True)) >= 2
    assert all("columns" in a or "error" in a for a in answers)
    assert "ask: generated 2/3" in stderr  # two batches


def test_sandbox_refuses_what_the_evaluation_refuses():
    assert "error" in run_in_sandbox("CREATE TABLE t (a INT);", "ATTACH DATABASE 'x.db' AS x", 2.0, 10)
    result = run_in_sandbox("CREATE TABLE t (a INT); INSERT INTO t VALUES (1), (2);", "SELECT a FROM t", 2.0, 10)
    assert result == {"columns": ["a"], "rows": [[1], [2]]}


def test_bad_input_is_one_line(capsys, tmp_path, lora_run):
    schema = tmp_path / "schema.sql"
    schema.write_text("CREATE TABLE t (a INT);")
    base = ["ask", "--run", str(lora_run)]
    cases = [
        ([*base, "How many?"], EXIT_USAGE, "--schema"),
        # a local path the user typed that does not exist: usage error (exit 2), like data.source
        ([*base, "--schema", str(tmp_path / "none.sql"), "q"], EXIT_USAGE, "no such file"),
        ([*base, "--schema", str(schema)], EXIT_USAGE, "exactly one of"),
        (["ask", "--run", str(tmp_path / "nope"), "--schema", str(schema), "q"], EXIT_USAGE, "no such file or folder"),
        ([*base, "--schema", str(schema), "--file", str(tmp_path / "q.jsonl")], EXIT_USAGE, "no such file"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\nnot json\n')  # a corrupt input: exit 3, naming the line and the cause
    cases.append(([*base, "--schema", str(schema), "--file", str(bad)], EXIT_MISSING_INPUT,
                  "bad.jsonl:2: not JSON (Expecting value at column 1)"))
    latin1 = tmp_path / "latin1.sql"
    latin1.write_bytes(b"CREATE TABLE caf\xe9 (a INT);")
    cases.append(([*base, "--schema", str(latin1), "q"], EXIT_MISSING_INPUT, "latin1.sql:1: not UTF-8 text"))
    for args, expected_code, text in cases:
        code, stdout, stderr = run_cli(capsys, *args)
        one_line_error(code, stderr, expected_code, text)
        assert stdout == ""
    assert Path(schema).read_text() == "CREATE TABLE t (a INT);"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "latin1.sql", "schema.sql"]  # nothing written
