"""score_predictions: execution match rules, gold failures, hostile predictions, metrics and breakdowns."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from job.errors import JobError
from job.evaluation.scoring import ScoringSettings, compare_metrics, gold_is_ordered, rows_match, score_predictions
from job.settings import shipped_sample

CONTEXT = (
    "CREATE TABLE dept (id INT, name TEXT); INSERT INTO dept VALUES (1, 'Sales'), (2, 'Ops');"
    "CREATE TABLE emp (id INT, name TEXT, dept_id INT, salary REAL);"
    "INSERT INTO emp VALUES (1, 'Ann', 1, 100.5), (2, 'Bob', 1, 90.25), (3, 'Cy', 2, 80.0),"
    " (4, 'Di', 2, 120.0);"
)
TIMEOUT = 0.5
METRIC_KEYS = ["n_rows", "n_gold_failed", "n_scored", "execution_accuracy", "execution_accuracy_single_db",
               "exact_match", "normalized_match", "valid_sql_rate", "empty_rate", "runaway_rate", "n_gold_transpiled",
               "n_context_transpiled", "n_pred_transpiled", "n_trivial", "n_scoring_errors", "ci95"]


def row(gold: str, row_id: object = 1, **extra: str) -> dict:
    fields = {"sql_complexity": "basic SQL", "sql_task_type": "analytics and reporting", "domain": "hr"}
    return {"id": row_id, "sql_prompt": "q?", "sql_context": CONTEXT, "sql": gold, **fields, **extra}


def matches(gold: str, pred: str) -> bool | None:
    _, records = score_predictions([row(gold)], [{"id": 1, "sql": pred}], timeout_s=TIMEOUT)
    return records[0]["exec_match"]


@pytest.fixture(scope="module")
def sample_rows() -> list[dict]:
    text = shipped_sample().read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_gold_as_prediction_matches_every_runnable_row_of_the_shipped_sample(sample_rows) -> None:
    predictions = [{"id": r["id"], "sql": r["sql"], "stopped": True} for r in sample_rows]
    start = time.monotonic()
    # single-DB here (test suites: tests/test_suites.py): which golds run does not depend on the suite
    metrics, records = score_predictions(sample_rows, predictions, settings=ScoringSettings(test_suite_size=0))
    assert time.monotonic() - start < 60  # a few seconds normally; generous for a shared CI machine
    assert list(metrics) == [*METRIC_KEYS, "test_suite", "fixed_now", "by_complexity", "by_task_type", "by_domain"]
    failed = [r for r in records if r["gold_error"]]
    assert metrics["n_rows"] == 400
    assert metrics["n_scoring_errors"] == 0 and not any(r["scoring_error"] for r in records)
    # 312 of 400 gold queries run as written; sqlglot rewrites and MySQL-compatible functions recover 48 more;
    # the 40 left name missing tables/columns, are ambiguous, invalid, or random (see the report's list)
    assert metrics["n_gold_failed"] == len(failed) == 40
    assert metrics["n_scored"] == 360 >= 0.9 * 400
    assert metrics["n_gold_transpiled"] == sum(bool(r["gold_transpiled"]) for r in records) == 38  # others: YEAR() etc.
    assert metrics["execution_accuracy"] == metrics["execution_accuracy_single_db"] == 1.0
    assert metrics["exact_match"] == metrics["normalized_match"] == 1.0
    assert metrics["runaway_rate"] == 0.0 and metrics["empty_rate"] == 0.0
    assert all(r["exec_match"] is None for r in failed)
    assert all(r["exec_match"] is True for r in records if not r["gold_error"])
    assert any(r["gold_error"].startswith("context:") for r in failed)


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ("SELECT e.name, d.name FROM emp e JOIN dept d ON e.dept_id = d.id WHERE d.name = 'Sales'",
         "SELECT emp.name, dept.name FROM emp JOIN dept ON emp.dept_id = dept.id WHERE dept.name = 'Sales'"),
        ("SELECT e.name, d.name FROM emp e JOIN dept d ON e.dept_id = d.id WHERE d.name = 'Sales'",
         "SELECT d.name AS department, e.name AS person FROM emp e JOIN dept d ON e.dept_id = d.id "
         "WHERE d.name = 'Sales'"),
        ("SELECT e.name FROM emp e JOIN dept d ON e.dept_id = d.id WHERE d.name = 'Ops'",
         "SELECT emp.name FROM dept INNER JOIN emp ON dept.id = emp.dept_id WHERE dept.name = 'Ops';"),
        ("SELECT d.name, COUNT(*) FROM emp e JOIN dept d ON e.dept_id = d.id GROUP BY d.name",
         "```sql\nSELECT COUNT(e.id) AS n, d.name FROM dept d JOIN emp e ON d.id = e.dept_id GROUP BY 2\n```"
         "\nThis counts employees per department."),
        ("SELECT name FROM emp WHERE salary > 95",
         "SELECT name FROM emp WHERE NOT salary <= 95 ORDER BY name DESC"),
    ],
)
def test_equivalent_rewrites_match(gold: str, pred: str) -> None:
    assert matches(gold, pred) is True


def test_join_equals_in_subquery_only_when_the_joined_key_is_unique() -> None:
    gold = "SELECT name FROM emp WHERE dept_id IN (SELECT id FROM dept WHERE name = 'Sales')"
    pred = "SELECT e.name FROM emp e JOIN dept d ON e.dept_id = d.id WHERE d.name = 'Sales'"
    keyed = CONTEXT.replace("dept (id INT, name TEXT)", "dept (id INT PRIMARY KEY, name TEXT)")
    _, records = score_predictions([row(gold, 1), {**row(gold, 2), "sql_context": keyed}],
                                   [{"id": 1, "sql": pred}, {"id": 2, "sql": pred}])
    # without a key, a suite database with two 'Sales' rows of one id makes the join repeat names
    assert [r["exec_match_single_db"] for r in records] == [True, True]
    assert [r["exec_match"] for r in records] == [False, True]


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ("SELECT name FROM emp WHERE dept_id = 1", "SELECT name FROM emp WHERE dept_id = 2"),  # other value
        ("SELECT name FROM emp WHERE dept_id = 1 AND salary > 95", "SELECT name FROM emp WHERE dept_id = 1"),
        ("SELECT SUM(salary) FROM emp", "SELECT AVG(salary) FROM emp"),  # another aggregate
        ("SELECT MAX(salary) FROM emp", "SELECT MIN(salary) FROM emp"),
        ("SELECT name FROM emp", "SELECT name, salary FROM emp"),  # extra column
        ("SELECT DISTINCT dept_id FROM emp", "SELECT dept_id FROM emp"),  # duplicates count
        ("SELECT name FROM emp", "SELECT nam FROM emp"),  # error
        ("SELECT name FROM emp", ""),  # empty
    ],
)
def test_wrong_predictions_do_not_match(gold: str, pred: str) -> None:
    assert matches(gold, pred) is False


def test_row_order_counts_only_when_the_gold_orders() -> None:
    assert matches("SELECT name FROM emp", "SELECT name FROM emp ORDER BY salary") is True
    ordered = "SELECT name, salary FROM emp ORDER BY salary DESC"
    assert matches(ordered, "SELECT salary, name FROM emp ORDER BY salary DESC") is True
    assert matches(ordered, "SELECT name, salary FROM emp ORDER BY salary ASC") is False
    assert matches(ordered, "SELECT name, salary FROM emp") is False  # rowid order differs from salary order
    assert gold_is_ordered("SELECT * FROM t ORDER BY a;")
    assert gold_is_ordered("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1")
    assert not gold_is_ordered("SELECT * FROM (SELECT a FROM t ORDER BY a LIMIT 3)")
    assert not gold_is_ordered("SELECT a, RANK() OVER (ORDER BY b) FROM t")
    assert not gold_is_ordered("SELECT a FROM t ORDER BY a; DELETE FROM t")


def test_float_tolerance_and_int_float_equality() -> None:
    assert matches("SELECT 0.3", "SELECT 0.1 + 0.2") is True
    assert matches("SELECT AVG(salary) FROM emp", "SELECT SUM(salary) / COUNT(*) FROM emp") is True
    assert matches("SELECT 0.3", "SELECT 0.3001") is False
    assert matches("SELECT COUNT(*) FROM emp", "SELECT SUM(1.0) FROM emp") is True  # 4 == 4.0
    assert matches("SELECT AVG(salary) FROM emp", "SELECT ROUND(AVG(salary), 2) FROM emp") is False
    assert rows_match([(1, None, "a")], [("a", 1, None)], ordered=False)
    assert not rows_match([(1, "1")], [(1, 1)], ordered=False)  # text is not a number


def test_dml_is_compared_by_resulting_table_contents() -> None:
    gold = "UPDATE emp SET salary = salary * 1.1 WHERE dept_id = 1"
    assert matches(gold, "UPDATE emp SET salary = salary + salary * 0.1 WHERE dept_id IN "
                         "(SELECT id FROM dept WHERE name = 'Sales')") is True
    assert matches(gold, "UPDATE emp SET salary = salary * 1.1") is False
    assert matches(gold, "SELECT * FROM emp") is False
    assert matches("DELETE FROM emp WHERE id = 3", "DELETE FROM emp WHERE name = 'Cy';") is True
    assert matches("DELETE FROM emp WHERE id = 3", "DELETE FROM emp WHERE id = 4") is False
    assert matches("INSERT INTO dept VALUES (3, 'HR')", "INSERT INTO dept (name, id) VALUES ('HR', 3)")
    assert matches("INSERT INTO dept VALUES (3, 'HR')", "INSERT INTO dept VALUES (3, 'IT')") is False
    assert matches("CREATE VIEW v AS SELECT name FROM emp", "CREATE VIEW v AS SELECT name FROM emp e") is True


def test_gold_failures_are_counted_apart_and_listed() -> None:
    rows = [
        row("SELECT NO_SUCH_FUNCTION(name) FROM emp", 1),
        {**row("SELECT a FROM s.t", 2), "sql_context": "CREATE SCHEMA s; CREATE TABLE s.t (a INT, a INT);"},
        row("SELECT name FROM emp", 3),
    ]
    predictions = [{"id": i, "sql": "SELECT name FROM emp"} for i in (1, 2, 3)]
    metrics, records = score_predictions(rows, predictions, timeout_s=TIMEOUT)
    assert (metrics["n_rows"], metrics["n_gold_failed"], metrics["n_scored"]) == (3, 2, 1)
    assert metrics["execution_accuracy"] == 1.0
    assert records[0]["gold_error"].startswith("gold:") and "NO_SUCH_FUNCTION" in records[0]["gold_error"]
    assert records[1]["gold_error"].startswith("context:")
    assert [r["exec_match"] for r in records] == [None, None, True]
    assert metrics["valid_sql_rate"] == 2 / 3  # over all rows: the context of row 2 has no emp table


HOSTILE = {
    "attach_file": "ATTACH DATABASE '{tmp}/evil.db' AS evil; CREATE TABLE evil.t (a INT); SELECT 1",
    "attach_relative": "ATTACH 'evil.db' AS evil",
    "recursive_cte": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "cross_join": "SELECT count(*) FROM " + ", ".join(f"emp e{i}" for i in range(16)),
    "pragma_write": "PRAGMA journal_mode = WAL; PRAGMA hard_heap_limit = 0",
    "many_statements": "SELECT name FROM emp;" * 3_000,
    "vacuum_into": "VACUUM INTO '{tmp}/copy.db'",
    "load_extension": "SELECT load_extension('{tmp}/evil.so')",
}


@pytest.fixture(scope="module")
def neighbours() -> tuple[list[dict], list[dict]]:
    rows = [row("SELECT name FROM emp WHERE dept_id = 1", 10), row("SELECT COUNT(*) FROM emp", 11)]
    predictions = [{"id": 10, "sql": "SELECT name FROM emp WHERE dept_id = 2"},
                   {"id": 11, "sql": "SELECT COUNT(1) FROM emp"}]
    return rows, predictions


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.timeout(30)  # a sandbox regression must fail, not hang CI
def test_hostile_predictions_are_fast_misses_touching_nothing(name, neighbours, tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    repo_files = set(os.listdir(Path(__file__).parents[1]))
    other_rows, other_predictions = neighbours
    _, baseline = score_predictions(other_rows, other_predictions, timeout_s=TIMEOUT)
    hostile = HOSTILE[name].replace("{tmp}", str(tmp_path))
    start = time.monotonic()
    metrics, records = score_predictions(
        [row("SELECT name FROM emp", 1), *other_rows],
        [{"id": 1, "sql": hostile}, *other_predictions],
        timeout_s=TIMEOUT,
    )
    assert time.monotonic() - start < TIMEOUT + 2.0
    assert records[0]["exec_match"] is False and records[0]["valid_sql"] is False and records[0]["pred_error"]
    assert records[1:] == baseline
    assert metrics["execution_accuracy"] == 1 / 3
    assert [p.name for p in tmp_path.iterdir()] == ["cwd"] and list(workdir.iterdir()) == []
    assert set(os.listdir(Path(__file__).parents[1])) == repo_files


def test_ids_match_robustly_and_missing_predictions_count_as_empty() -> None:
    rows = [row("SELECT name FROM emp", 5), row("SELECT id FROM emp", "6"), row("SELECT 1", 7)]
    predictions = [{"id": "5", "sql": "SELECT name FROM emp"},
                   {"id": 6.0, "raw": "Answer:\nSELECT id FROM emp;"}]
    metrics, records = score_predictions(rows, predictions)
    assert [r["exec_match"] for r in records] == [True, True, False]
    assert records[2]["empty"] and records[2]["pred_error"] == "empty prediction"
    assert metrics["empty_rate"] == 1 / 3 and metrics["exact_match"] == 2 / 3
    with pytest.raises(JobError, match="99"):
        score_predictions(rows, [{"id": 99, "sql": "SELECT 1"}])
    with pytest.raises(JobError, match="two predictions"):
        score_predictions(rows, [{"id": 5, "sql": "SELECT 1"}, {"id": "5", "sql": "SELECT 2"}])


def test_exact_and_normalized_match() -> None:
    gold = "SELECT name FROM emp WHERE dept_id = 1 AND salary > 95;"
    predictions = [
        {"id": 1, "sql": "select  name\nfrom emp where dept_id = 1 and salary > 95"},
        {"id": 2, "sql": "SELECT emp.name FROM EMP WHERE (salary > 95) AND emp.dept_id = 1"},
        {"id": 3, "sql": "SELECT name FROM emp WHERE dept_id = 2 AND salary > 95"},
        {"id": 4, "sql": "SELECT name FROM emp WHERE"},
    ]
    metrics, records = score_predictions([row(gold, i) for i in (1, 2, 3, 4)], predictions)
    assert [r["exact_match"] for r in records] == [True, False, False, False]
    assert [r["normalized_match"] for r in records] == [True, True, False, False]
    assert metrics["valid_sql_rate"] == 3 / 4


def test_runaway_rate_uses_stopped_when_present() -> None:
    rows = [row("SELECT 1", i) for i in range(4)]
    stops = [True, False, True, True]
    predictions = [{"id": i, "sql": "SELECT 1", "stopped": s} for i, s in enumerate(stops)]
    metrics, records = score_predictions(rows, predictions)
    assert metrics["runaway_rate"] == 0.25 and [r["stopped"] for r in records] == stops
    metrics, _ = score_predictions(rows, [{"id": i, "sql": "SELECT 1"} for i in range(4)])
    assert metrics["runaway_rate"] is None


def test_breakdowns_have_the_right_groups_and_counts(sample_rows) -> None:
    rows = sample_rows[:60]
    metrics, _ = score_predictions(rows, [{"id": r["id"], "sql": r["sql"]} for r in rows], top_domains=3)
    for name, field in (("by_complexity", "sql_complexity"), ("by_task_type", "sql_task_type")):
        assert {k: v["n_rows"] for k, v in metrics[name].items()} == Counter(r[field] for r in rows)
    domains = Counter(r["domain"] for r in rows)
    assert len(metrics["by_domain"]) == 3
    assert sorted((v["n_rows"] for v in metrics["by_domain"].values()), reverse=True) == sorted(
        domains.values(), reverse=True)[:3]
    for group in metrics["by_complexity"].values():
        assert list(group) == METRIC_KEYS
        assert group["n_scored"] + group["n_gold_failed"] == group["n_rows"]
    assert sum(g["n_gold_failed"] for g in metrics["by_complexity"].values()) == metrics["n_gold_failed"]


def test_compare_metrics_gives_deltas() -> None:
    rows = [row("SELECT name FROM emp", 1, sql_complexity="a"),
            row("SELECT id FROM emp", 2, sql_complexity="b")]
    base, _ = score_predictions(rows, [{"id": 1, "sql": "SELECT 1"}, {"id": 2, "sql": ""}])
    right = "SELECT name FROM emp"
    tuned, _ = score_predictions(rows, [{"id": 1, "sql": right}, {"id": 2, "sql": "SELECT 9"}])
    delta = compare_metrics(base, tuned)
    assert delta["execution_accuracy"] == 0.5 and delta["empty_rate"] == -0.5
    assert delta["runaway_rate"] is None
    assert delta["by_complexity"]["a"]["execution_accuracy"] == 1.0
    assert delta["by_complexity"]["b"]["valid_sql_rate"] == 1.0
    assert set(delta["by_task_type"]) == {"analytics and reporting"}
