"""Hostile SQL never crashes scoring: deep nesting, huge text, odd bytes and fuzzed SQL-ish strings in the gold,
the context or the prediction become that row's error, counted and listed, within bounded time."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.evaluation.sandbox import Limits
from job.evaluation.scoring import ScoringSettings, score_predictions
from job.evaluation.sql_extract import extract_sql

CONTEXT = "CREATE TABLE t (a INT, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y');"
SETTINGS = ScoringSettings(limits=Limits(timeout_s=0.5), test_suite_size=2, suite_candidates=4, workers=1)
RECORD_KEYS = {"id", "gold_error", "pred_error", "scoring_error", "exec_match", "exec_match_single_db", "valid_sql",
               "empty", "exact_match", "normalized_match"}


def _row(gold: str = "SELECT a FROM t WHERE a = 1", context: str = CONTEXT, **extra: str) -> dict:
    return {"id": 1, "sql_prompt": "q?", "sql_context": context, "sql": gold, **extra}


def _score(row: dict, prediction: str) -> tuple[dict, dict]:
    metrics, (record,) = score_predictions([row], [{"id": 1, "sql": prediction}], settings=SETTINGS)
    return metrics, record


def _nested(depth: int) -> str:
    return "(" * depth + "1" + ")" * depth


def test_a_deeply_nested_prediction_is_scored_not_a_crash() -> None:
    """60 parentheses: sqlglot's parser recurses past Python's limit; SQLite runs it; the row is simply scored."""
    metrics, record = _score(_row(), f"SELECT {_nested(60)}")
    assert record["pred_error"] is None and record["valid_sql"] is True
    assert record["exec_match_single_db"] is True  # 1 is the gold's answer on the row's own database
    assert record["normalized_match"] is False and metrics["n_rows"] == 1


def test_a_deeply_nested_context_statement_is_the_rows_context_error() -> None:
    context = f"{CONTEXT} INSERT INTO missing VALUES ({_nested(80)});"
    metrics, record = _score(_row(context=context), "SELECT a FROM t WHERE a = 1")
    assert record["gold_error"].startswith("context: OperationalError: no such table: missing")
    assert metrics["n_gold_failed"] == 1 and metrics["n_scored"] == 0 and metrics["n_rows"] == 1


def test_a_gold_the_scorer_cannot_parse_is_left_out_counted_and_named() -> None:
    """SQLite runs it, but sqlglot cannot build its test suite: the row is left out, never scored on less."""
    metrics, record = _score(_row(gold=f"SELECT a FROM t WHERE a = {_nested(60)}"), "SELECT 1")
    assert "RecursionError" in record["gold_error"] and record["scoring_error"] == record["gold_error"]
    assert record["exec_match"] is None
    assert metrics["n_scoring_errors"] == 1 and metrics["n_gold_failed"] == 1 and metrics["execution_accuracy"] is None


def test_a_megabyte_prediction_is_refused_before_any_parsing() -> None:
    huge = "SELECT a FROM t WHERE a = 1 OR " + "a = 1 OR " * 120_000 + "a = 1"
    start = time.monotonic()
    metrics, record = _score(_row(), huge)
    assert time.monotonic() - start < 5  # it took 25 s and 333 MB when the normalizer parsed it first
    assert record["pred_error"] == "prediction longer than 100000 characters"
    assert record["valid_sql"] is False and record["exec_match"] is False and record["empty"] is False
    assert record["pred_sql"] == "" and metrics["empty_rate"] == 0.0


def test_sql_too_long_to_parse_runs_as_written_only() -> None:
    """Between max_parse_chars and max_sql_chars, SQLite judges the text; sqlglot never sees it."""
    long = "SELECT a FROM t WHERE a = 1" + " OR a = 1" * 3_000  # 27 kB
    start = time.monotonic()
    _, record = _score(_row(), long)
    assert time.monotonic() - start < 5  # dialect rewrites and normalization of it took about 8 s
    assert record["pred_error"] is not None and "Expression tree is too large" in record["pred_error"]
    assert record["pred_transpiled"] is False


@pytest.mark.parametrize("prediction", ["SELECT '\ud800'", "SELECT 1\x00", "SELECT a FROM t\udfff;",
                                        "SELECT\x00\ud800;"])
def test_text_sqlite_cannot_take_is_the_predictions_error(prediction: str) -> None:
    _, record = _score(_row(), prediction)
    assert record["valid_sql"] is False and record["scoring_error"] is None
    assert "NUL character" in record["pred_error"] or "not valid Unicode" in record["pred_error"]


@pytest.mark.parametrize("context", ["CREATE TABLE t (a INT);\x00",
                                     "CREATE TABLE t (a TEXT); INSERT INTO t VALUES ('\ud800');"])
def test_a_context_sqlite_cannot_take_is_the_rows_context_error(context: str) -> None:
    metrics, record = _score(_row(context=context), "SELECT 1")
    assert record["gold_error"].startswith("context: text ") and metrics["n_gold_failed"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1\nAbc" + " a" * 50_000 + "x",  # prose detection: 25 s before
        "```" + "a" * 100_000,  # a fence that never ends its line: 4 s before
        "SELECT '\n" + "a;\n" * 30_000,  # an unclosed quote over many lines with `;`: cubic before (hours)
        "SELECT a\n" + "\n" * 50_000 + "FROM t",  # blank lines before a continuation: quadratic before
        "SELECT '" + ";" * 100_000,
    ],
    ids=["prose", "fence", "unclosed-quote-lines", "blank-lines", "unclosed-quote"],
)
def test_extraction_is_linear_on_hostile_answers(text: str) -> None:
    start = time.monotonic()
    extract_sql(text)
    assert time.monotonic() - start < 2


_KEYWORDS = ["SELECT", "FROM", "WHERE", "GROUP BY", "ORDER BY", "HAVING", "LIMIT", "UNION ALL", "JOIN", "ON", "AND",
             "OR", "NOT", "IN", "LIKE", "CASE", "WHEN", "THEN", "ELSE", "END", "WITH RECURSIVE", "AS", "INSERT INTO",
             "VALUES", "UPDATE", "SET", "DELETE", "CREATE TABLE", "CREATE TRIGGER", "CREATE SCHEMA", "BEGIN", "DROP",
             "ATTACH", "PRAGMA", "VACUUM INTO", "load_extension(", "EXTRACT(YEAR FROM", "INTERVAL 1 DAY",
             "DATE_SUB(", "NOW()", "CURRENT_DATE", "COUNT(*)", "SUM(", "MAX(", "DISTINCT", "t", "a", "b", "t.a",
             "s.t", "`x`", '"y"', "[z]", "x'00'", "randomblob(", "zeroblob(1000000000)"]
_ODD = ["\x00", "\ud800", "\udfff", "\u202e", "\ufeff", "\U0001f4a5", "\r", "\n", "\t", "\\", "'", '"', "`", ";",
        "--", "/*", "*/", "```", "```sql\n", "<|im_end|>", "<end_of_turn>", "<start_of_turn>model", "(", ")", ",",
        "*", "=", "%", "?", ":", "$1", "@@", "\x1b[31m", "<script>", "|", "\u0085", "\u2028"]
_token = st.one_of(
    st.sampled_from(_KEYWORDS), st.sampled_from(_ODD), st.integers(-(10**30), 10**30).map(str), st.text(max_size=6)
)
_sqlish = st.lists(_token, max_size=40).map(" ".join)
_deep = st.tuples(st.sampled_from(["SELECT ", "SELECT a FROM t WHERE a IN ", "INSERT INTO t VALUES ", ""]),
                  st.integers(20, 600)).map(lambda p: p[0] + _nested(p[1]))
_huge = st.tuples(st.sampled_from([" OR a = 1", "(", ";", "'", "SELECT 1;", "a", "\n", "```", " a", "/*"]),
                  st.integers(500, 40_000)).map(lambda p: "SELECT a FROM t WHERE 1" + p[0] * p[1])
_hostile = st.one_of(_sqlish, _deep, _huge, st.text(max_size=200),
                     st.binary(max_size=200).map(lambda raw: raw.decode("latin-1")))


@settings(max_examples=60)
@given(gold=_hostile | st.just("SELECT a FROM t WHERE a = 1"), context=_hostile | st.just(CONTEXT),
       prediction=_hostile, group=_sqlish)
def test_scoring_never_raises_on_fuzzed_sql(gold: str, context: str, prediction: str, group: str) -> None:
    row = _row(gold=gold, context=context, domain=group, sql_complexity=group)
    metrics, records = score_predictions([row], [{"id": 1, "sql": prediction, "stopped": False}], settings=SETTINGS)
    (record,) = records
    assert set(record) >= RECORD_KEYS
    for key in ("gold_error", "pred_error", "scoring_error"):
        assert record[key] is None or isinstance(record[key], str)
    assert (record["exec_match"] is None) == (record["gold_error"] is not None)
    assert metrics["n_rows"] == 1 and metrics["n_scored"] + metrics["n_gold_failed"] == 1
    json.dumps(records)  # the per-row records can always be written
