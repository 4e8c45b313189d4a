"""extract_sql: fences, prose around the SQL, chat tokens, multi-statement answers, idempotence."""

from __future__ import annotations

import json

import pytest

from job.evaluation.sql_extract import extract_sql
from job.settings import shipped_sample


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("SELECT * FROM t;", "SELECT * FROM t;"),
        ("```sql\nSELECT a\nFROM t\nWHERE b = 1;\n```\nThis selects a.", "SELECT a\nFROM t\nWHERE b = 1;"),
        ("```\nWITH x AS (SELECT 1) SELECT * FROM x\n```", "WITH x AS (SELECT 1) SELECT * FROM x"),
        ("```sql\nSELECT a FROM t", "SELECT a FROM t"),  # fence never closed: generation hit the token limit
        ("```python\nprint(1)\n```\n```sql\nSELECT 2;\n```", "SELECT 2;"),
        ("Here is the query: SELECT name FROM t WHERE x = 'a;b'; This returns names.",
         "SELECT name FROM t WHERE x = 'a;b';"),
        ("Here is the query:\n\nSELECT name\nFROM t\n\nThis query returns the names.", "SELECT name\nFROM t"),
        ("Query:\nselect a from t where b = 'x'", "select a from t where b = 'x'"),
        ("The answer is SELECT COUNT(*) FROM t", "SELECT COUNT(*) FROM t"),
        ("SELECT a\nFROM t\nThe query above returns a.", "SELECT a\nFROM t"),
        ("SELECT a FROM t\n- This selects a", "SELECT a FROM t"),
        ("SELECT a FROM t\n**Explanation:** it selects a", "SELECT a FROM t"),
        ("SELECT a FROM t\n\nWHERE b = 1\n\nNote: b is an int.", "SELECT a FROM t\nWHERE b = 1"),
        ("SELECT 1; -- done\n", "SELECT 1;"),
        ("<start_of_turn>model\nSELECT 1;<end_of_turn>\n<start_of_turn>user\nmore", "SELECT 1;"),
        ("<|im_start|>assistant\nSELECT 2<|im_end|>", "SELECT 2"),
        ("SELECT a FROM t;</s>", "SELECT a FROM t;"),
        ("SELECT 1<eos><pad><pad>", "SELECT 1"),
    ],
)
def test_extracts_the_statement(answer: str, expected: str) -> None:
    assert extract_sql(answer) == expected


def test_keeps_genuine_multi_statement_answers_and_cuts_trailing_prose() -> None:
    answer = "INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);\nExplanation: adds two rows."
    assert extract_sql(answer) == "INSERT INTO t VALUES (1);\nINSERT INTO t VALUES (2);"
    assert extract_sql("UPDATE t SET a = 1;\nSELECT * FROM t;") == "UPDATE t SET a = 1;\nSELECT * FROM t;"
    trigger = "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 1; END;"
    assert extract_sql(f"{trigger}\nDone.") == trigger  # the `;` inside BEGIN...END does not end it


@pytest.mark.parametrize(
    "answer",
    ["", "   ", "I don't know.", "Select the rows from the table.", "With this query we see it.", "<eos>"],
)
def test_returns_empty_when_nothing_sql_like(answer: str) -> None:
    assert extract_sql(answer) == ""


def test_gold_sql_survives_fences_and_explanations_and_is_idempotent() -> None:
    text = shipped_sample().read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    for row in rows:
        gold, explanation = row["sql"].strip(), row["sql_explanation"]
        fenced = f"```sql\n{gold}\n```\n{explanation}"
        for answer in (gold, fenced, f"Here is the SQL query:\n{gold}\n\n{explanation}"):
            extracted = extract_sql(answer)
            assert extracted == gold, (row["id"], answer)
            assert extract_sql(extracted) == extracted
