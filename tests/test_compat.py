"""SQL from other dialects made runnable in SQLite without changing its meaning: pinned to hand-checked results."""

from __future__ import annotations

import json

import pytest

from job.evaluation.compat import qualify_equijoined, sqlite_rewrites
from job.evaluation.sandbox import Limits, build_context
from job.evaluation.scoring import _run_gold, score_predictions
from job.settings import shipped_sample

NOW = "2024-01-15 12:00:00"  # the default evaluation.fixed_now

# Shipped rows whose gold only runs after rewriting, with the answer worked out by hand from the row's context.
PINNED = {
    5102: [(5400,)],  # defense.eu_humanitarian_assistance -> plain table; 1500 + 1800 + 2100
    5137: [("Language 1", "2022-12-26", 500)],  # Postgres DATE_TRUNC('week'): 2023-01-01 is a Sunday -> Monday
    5158: [(5,)],  # EXTRACT(MONTH FROM d) = 1: all five January dates
    5181: [(3.0,)],  # EXTRACT(DAY ...) BETWEEN 2 AND 6 AND EXTRACT(MONTH ...) = 2: five fares of 3.00
    5188: [("California", 40.0), ("Florida", 20.0), ("Massachusetts", 20.0), ("Washington", 20.0)],  # ::FLOAT
    5204: [(12.0,)],  # quick_service.menu_items: 7.50 + 4.50
    5237: [(1, 20.5), (2, 21.2), (3, 22.1)],  # EXTRACT(MONTH ...) as a group key
    5254: [("PatentU", 200), ("PatentW", 170), ("PatentX", 150)],  # biosensor.patents, top 3 UK
    5390: [(1, 2)],  # EXTRACT(QUARTER ...): Alice (January) and Bob (February) in Q1
    5406: [("Gene Editing", 22)],  # genetics.experiments above the average of 18.3
    5407: [(3, "Store C", 60), (2, "Store B", 45), (1, "Store A", 30)],  # store_id equated by the inner join
    5142: [],  # DATE_SUB(CURDATE(), INTERVAL 1 YEAR) = 2023-01-15: every 2022 program is older
}


@pytest.fixture(scope="module")
def shipped() -> dict[int, dict]:
    return {row["id"]: row for row in map(json.loads, shipped_sample().read_text().splitlines())}


@pytest.mark.parametrize("row_id", sorted(PINNED))
def test_rewritten_gold_gives_the_hand_checked_answer(shipped, row_id) -> None:
    context = build_context(shipped[row_id]["sql_context"], Limits())
    try:
        error, result, text, rewritten = _run_gold(context, shipped[row_id]["sql"])
    finally:
        context.close()
    assert error is None and rewritten, text
    assert result.rows == PINNED[row_id]


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        # MySQL: a year before the fixed now is 2023-01-15; the boundary day counts
        ("SELECT COUNT(*) FROM t WHERE d >= DATE_SUB(CURDATE(), INTERVAL 1 YEAR)", [(2,)]),
        ("SELECT COUNT(*) FROM t WHERE d >= DATE_SUB(NOW(), INTERVAL 6 MONTH)", [(1,)]),
        # T-SQL DATEADD/GETDATE and DATEDIFF(day, start, end) = end - start
        ("SELECT COUNT(*) FROM t WHERE d >= DATEADD(year, -1, GETDATE())", [(2,)]),
        ("SELECT DATEDIFF(day, MIN(d), MAX(d)) FROM t", [(361,)]),
        # MySQL DATEDIFF(end, start), YEAR(), MONTH(), TIMESTAMPDIFF(unit, start, end)
        ("SELECT DATEDIFF(MAX(d), MIN(d)) FROM t", [(361,)]),
        ("SELECT YEAR(d), MONTH(d) FROM t ORDER BY d", [(2023, 1), (2023, 1), (2024, 1)]),
        ("SELECT TIMESTAMPDIFF(YEAR, '2020-05-01', d) FROM t ORDER BY d", [(2,), (2,), (3,)]),
        # Postgres interval arithmetic and CURRENT_DATE, pinned
        ("SELECT COUNT(*) FROM t WHERE d > CURRENT_DATE - INTERVAL '30' DAY", [(1,)]),
        ("SELECT COUNT(*) FROM t WHERE d BETWEEN date('now', '-1 year') AND date('now')", [(2,)]),
        # weeks and quarters, which SQLite's date modifiers lack: 7 days and 3 months (sqlglot's '1 WEEK' is NULL)
        ("SELECT COUNT(*) FROM t WHERE d >= DATE_SUB(CURDATE(), INTERVAL 1 WEEK)", [(1,)]),
        ("SELECT COUNT(*) FROM t WHERE d > DATE_ADD(CURRENT_DATE, INTERVAL -53 WEEK)", [(3,)]),
        ("SELECT COUNT(*) FROM t WHERE d >= DATEADD(quarter, -4, GETDATE())", [(2,)]),
        ("SELECT COUNT(*) FROM t WHERE d >= DATE_SUB('2024-01-15', INTERVAL '2' QUARTER)", [(1,)]),
    ],
)
def test_date_functions_use_the_fixed_now(gold, expected) -> None:
    context = "CREATE TABLE t (d DATE); INSERT INTO t VALUES ('2023-01-14'), ('2023-01-15'), ('2024-01-10');"
    row = {"id": 1, "sql_prompt": "q", "sql_context": context, "sql": gold}
    _, records = score_predictions([row], [{"id": 1, "sql": gold}])
    assert records[0]["gold_error"] is None and records[0]["exec_match"] is True
    built = build_context(context, Limits(fixed_now=NOW))
    try:
        _, result, _, _ = _run_gold(built, gold)
    finally:
        built.close()
    assert result.rows == expected


def test_the_fixed_now_is_configurable_and_sqlite_clock_functions_never_read_the_clock() -> None:
    for now, expected in (("2024-01-15 12:00:00", [("2024-01-15", "2024-01-15 12:00:00")]),
                          ("2021-06-30 08:00:00", [("2021-06-30", "2021-06-30 08:00:00")])):
        built = build_context("CREATE TABLE t (a INT);", Limits(fixed_now=now))
        try:
            _, result, _, rewritten = _run_gold(built, "SELECT CURRENT_DATE, datetime('now')")
        finally:
            built.close()
        assert result.rows == expected and rewritten


def test_unknown_quoted_names_stay_errors_after_rewriting() -> None:
    # SQLite reads an unknown "name" as the string 'name': rewrites quote with backticks, which never do that
    texts = [text for text, _ in sqlite_rewrites("SELECT COUNT(*) FROM t WHERE region = 'x'", NOW)]
    assert all('"region"' not in text for text in texts) and any("`region`" in text for text in texts)
    row = {"id": 1, "sql_prompt": "q", "sql_context": "CREATE TABLE t (a INT); INSERT INTO t VALUES (1);",
           "sql": "SELECT COUNT(*) FROM t WHERE region = 'Northwest'"}
    _, records = score_predictions([row], [{"id": 1, "sql": "SELECT 0"}])
    assert "no such column: region" in records[0]["gold_error"]


def test_ambiguity_is_resolved_only_through_an_inner_equijoin() -> None:
    joined = "SELECT id, n FROM a JOIN b ON a.id = b.id"
    assert qualify_equijoined(joined, "id") == "SELECT a.id, n FROM a JOIN b ON a.id = b.id"
    assert qualify_equijoined("SELECT id FROM a LEFT JOIN b ON a.id = b.id", "id") is None
    assert qualify_equijoined("SELECT id FROM a JOIN b ON a.k = b.k", "id") is None


def test_predictions_get_the_same_rewrites_and_are_flagged() -> None:
    context = "CREATE TABLE t (d DATE, n INT); INSERT INTO t VALUES ('2023-02-01', 1), ('2023-03-01', 2);"
    row = {"id": 1, "sql_prompt": "q", "sql_context": context,
           "sql": "SELECT SUM(n) FROM t WHERE CAST(STRFTIME('%m', d) AS INTEGER) = 2"}
    _, records = score_predictions([row], [{"id": 1, "sql": "SELECT SUM(n) FROM t WHERE EXTRACT(MONTH FROM d) = 2"}])
    assert records[0]["exec_match"] is True and records[0]["pred_transpiled"] and not records[0]["gold_transpiled"]
