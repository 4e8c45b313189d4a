"""Witness databases: built to satisfy the gold, so that no constant (nor the answer hard-coded) passes a row
whose random databases all give it an empty, NULL or unchanged answer; a row where none can be built is trivial."""

from __future__ import annotations

import random

import pytest

from job.evaluation.sandbox import build_context
from job.evaluation.scoring import _run_gold, gold_is_ordered, score_predictions
from job.evaluation.suites import (
    ValuePools,
    distill,
    nontrivial,
    parse_schema,
    random_database,
    row_seed,
    run_on_copy,
)
from job.evaluation.witnesses import read_plan, witness_database

SHOP = (
    "CREATE TABLE customers (cid INT PRIMARY KEY, name VARCHAR(40) NOT NULL, region TEXT);"
    "CREATE TABLE orders (order_no INT, buyer INT, total DECIMAL(10, 2), placed DATE);"
    "INSERT INTO customers VALUES (1, 'Ann', 'North'), (2, 'Bob', 'South');"
    "INSERT INTO orders VALUES (10, 1, 20.0, '2021-05-01'), (11, 2, 35.5, '2022-02-02');"
)
# Four filters (a date window and a LIKE among them) on two tables joined on differently named columns, and a
# dozen rows per group: no row of the context passes, nor does any of 64 random databases of this schema.
NEEDLE = (
    "SELECT c.name, SUM(o.total) FROM orders o JOIN customers c ON o.buyer = c.cid "
    "WHERE c.region = 'Northwest Territories' AND o.total BETWEEN 1234.5 AND 1234.75 "
    "AND o.placed >= DATE('2024-01-15', '-7 days') AND c.name LIKE '%zq%' GROUP BY c.name HAVING COUNT(*) >= 12"
)


def _row(gold: str, row_id: int = 1, context: str = SHOP) -> dict:
    return {"id": row_id, "sql_prompt": "q?", "sql_context": context, "sql": gold, "sql_complexity": "single join",
            "sql_task_type": "analytics and reporting", "domain": "retail"}


def _suite_of(gold: str, context: str = SHOP, **options):
    built = build_context(context)
    error, result, text, _ = _run_gold(built, gold)
    assert error is None, error
    suite = distill(built, text, result, ordered=gold_is_ordered(text), size=8, budget=64,
                    seed=row_seed(1, 0), **options)
    return built, result, suite


def _answers(gold: str, context: str = SHOP, **options) -> tuple[list, str | None]:
    built, result, suite = _suite_of(gold, context, **options)
    try:
        return [result, *suite.gold], suite.trivial
    finally:
        suite.close()
        built.close()


def _scores(gold: str, predictions: list[str], context: str = SHOP) -> list[bool]:
    rows = [_row(gold, i, context) for i in range(len(predictions))]
    _, records = score_predictions(rows, [{"id": i, "sql": p} for i, p in enumerate(predictions)])
    return [r["exec_match"] for r in records]


# A NULL aggregate and a DML statement behind as many filters: random databases leave them NULL / unchanged.
NULL_AVERAGE = (
    "SELECT AVG(o.total) FROM orders o JOIN customers c ON o.buyer = c.cid WHERE c.region = 'Yukon' "
    "AND o.total > 1000 AND o.placed BETWEEN '2023-03-01' AND '2023-03-31' AND c.name LIKE 'Q%' "
    "AND o.order_no BETWEEN 4242 AND 4243 AND c.cid > 900"
)
NOOP_DELETE = (
    "DELETE FROM orders WHERE buyer IN (SELECT cid FROM customers WHERE region = 'Yukon' AND name LIKE '%qq%') "
    "AND total BETWEEN 5000 AND 5000.5 AND placed >= DATE('2024-01-15', '-3 days') "
    "AND order_no BETWEEN 4242 AND 4243 AND buyer > 900"
)


@pytest.mark.parametrize("gold", [NEEDLE, NULL_AVERAGE, NOOP_DELETE])
def test_random_databases_alone_give_these_golds_a_trivial_answer(gold) -> None:
    """The premise: before witnesses, a constant passed such rows."""
    built = build_context(SHOP)
    try:
        tables = parse_schema(built.template)
        limits = built.template.limits
        pools = ValuePools(tables, built.template.snapshot(), gold, limits.fixed_now, limits)
        rng = random.Random(0)
        for _ in range(64):
            with random_database(built, tables, pools, rng) as db:
                before = db.snapshot()
                assert not nontrivial(run_on_copy(db, gold), before)
    finally:
        built.close()


def test_a_witness_satisfies_every_filter_and_the_join() -> None:
    answers, trivial = _answers(NEEDLE)
    assert answers[0].rows == [] and trivial is None
    assert any(nontrivial(a, None) for a in answers[1:])
    # the empty constant, the whole table, and an empty answer written out all fail; the gold passes
    assert _scores(NEEDLE, [NEEDLE, "SELECT * FROM customers WHERE 1=0", "SELECT name, total FROM customers, orders",
                            "SELECT NULL, NULL WHERE 0"]) == [True, False, False, False]


def test_the_plan_reads_filters_joins_group_sizes_and_skips_negated_conditions() -> None:
    gold = ("SELECT c.region FROM customers c JOIN orders o ON o.buyer = c.cid WHERE o.total > 99.5 "
            "AND c.cid NOT IN (SELECT buyer FROM orders WHERE placed < '2020-01-01') "
            "GROUP BY c.region HAVING COUNT(*) > 25")
    built = build_context(SHOP)
    try:
        tables = parse_schema(built.template)
        limits = built.template.limits
        pools = ValuePools(tables, built.template.snapshot(), gold, limits.fixed_now, limits)
        plan = read_plan(gold, built.template, tables, pools)
        assert plan.passing[("orders", "total")] and all(v > 99.5 for v in plan.passing[("orders", "total")])
        assert [("customers", "cid"), ("orders", "buyer")] in plan.groups
        assert ("orders", "placed") not in plan.passing  # under NOT IN: the gold wants it false
        assert ("customers", "region") in plan.grouped and plan.min_rows == {"customers": 26, "orders": 26}
        with witness_database(built, tables, pools, plan, random.Random(0), plain=True) as db:
            assert db.run_query("SELECT COUNT(*) FROM customers").rows == [(26,)]
            assert db.run_query("SELECT COUNT(DISTINCT cid) FROM customers").rows == [(26,)]  # a key stays one
    finally:
        built.close()
    answers, trivial = _answers(gold)
    assert answers[0].rows == [] and trivial is None


def test_a_null_aggregate_gets_a_database_where_it_is_a_number() -> None:
    answers, trivial = _answers(NULL_AVERAGE)
    assert answers[0].rows == [(None,)] and trivial is None
    assert any(a.rows[0][0] not in (None, 0) for a in answers[1:])
    assert _scores(NULL_AVERAGE, [NULL_AVERAGE, "SELECT NULL", "SELECT 0", "SELECT AVG(total) FROM orders"]) == \
        [True, False, False, False]


def test_a_dml_gold_gets_a_database_it_changes() -> None:
    built, result, suite = _suite_of(NOOP_DELETE)
    try:
        assert result.tables == built.template.snapshot()  # nothing in the context to delete
        assert suite.trivial is None
        assert any(after.tables != db.snapshot() for db, after in zip(suite.databases, suite.gold, strict=True))
    finally:
        suite.close()
        built.close()
    assert _scores(NOOP_DELETE, [NOOP_DELETE, "DELETE FROM orders WHERE 1 = 0", "DELETE FROM orders WHERE buyer > 900",
                                 "SELECT 1"]) == [True, False, False, False]


def test_a_filter_hidden_in_a_view_is_read_from_the_view() -> None:
    context = SHOP + "CREATE VIEW big_orders AS SELECT * FROM orders WHERE total >= 500;"
    gold = "SELECT COUNT(*) FROM big_orders"
    assert _scores(gold, [gold, "SELECT COUNT(*) FROM orders", "SELECT 0"], context) == [True, False, False]


def test_a_hard_coded_answer_fails_and_a_gold_that_reads_no_data_is_trivial() -> None:
    # the gold's answer on the context's own rows, written out: right there, wrong on any other database
    assert _scores("SELECT COUNT(*) FROM orders", ["SELECT 2", "SELECT COUNT(1) FROM orders"]) == \
        [False, True]
    _, trivial = _answers("SELECT 'open' AS status")
    assert trivial == "the same answer on every database (a query that returns it as literals matches)"


@pytest.mark.parametrize(
    ("gold", "reason"),
    [
        ("SELECT name FROM customers WHERE cid > 5 AND cid < 3", "empty result on every database"),
        # a primary key rules out the groups the gold asks for
        ("SELECT MAX(total) FROM orders WHERE buyer IN (SELECT cid FROM customers GROUP BY cid HAVING COUNT(*) > 1)",
         "only NULL, 0 or '' on every database"),
        ("DELETE FROM orders WHERE total > 10 AND total < 5", "DML that changes nothing on any database"),
    ],
)
def test_a_row_no_database_can_make_non_trivial_is_trivial_yet_scored(gold, reason) -> None:
    _, trivial = _answers(gold)
    assert trivial == reason
    metrics, records = score_predictions([_row(gold), _row(NEEDLE, 2)],
                                         [{"id": 1, "sql": gold}, {"id": 2, "sql": "SELECT 1"}])
    assert [r["trivial"] for r in records] == [True, False] and records[0]["trivial_reason"] == reason
    assert records[0]["exec_match"] is True and metrics["n_scored"] == 2 and metrics["n_trivial"] == 1
    assert metrics["by_complexity"]["single join"]["n_trivial"] == 1
    assert metrics["execution_accuracy"] == 0.5  # still counted like any other row


EQUIVALENT = [
    (NEEDLE, "SELECT customers.name, SUM(total) FROM customers INNER JOIN orders ON cid = buyer "
             "WHERE name LIKE '%zq%' AND placed >= '2024-01-08' AND total >= 1234.5 AND total <= 1234.75 "
             "AND region = 'Northwest Territories' GROUP BY 1 HAVING 11 < COUNT(order_no IS NULL)"),
    ("SELECT COUNT(*) FROM orders WHERE buyer IN (1, 2) AND total > 30",
     "SELECT COUNT(order_no IS NULL) FROM orders WHERE (buyer = 2 OR buyer = 1) AND NOT total <= 30"),
    ("SELECT region, COUNT(*) FROM customers GROUP BY region HAVING COUNT(*) > 3",
     "SELECT region, COUNT(cid) FROM customers GROUP BY region HAVING COUNT(*) >= 4"),
    ("SELECT AVG(total) FROM orders WHERE placed BETWEEN '2023-03-01' AND '2023-03-31'",
     "SELECT SUM(total) * 1.0 / COUNT(total) FROM orders WHERE strftime('%Y-%m', placed) = '2023-03'"),
    ("UPDATE orders SET total = 0 WHERE placed < DATE('2024-01-15', '-2 years') AND buyer = 7",
     "UPDATE orders SET total = 0.0 WHERE buyer = 7 AND placed < '2022-01-15'"),
    (NOOP_DELETE, "DELETE FROM orders WHERE order_no IN (4242, 4243) AND total >= 5000 AND total <= 5000.5 "
                  "AND placed >= '2024-01-12' AND buyer > 900 AND EXISTS (SELECT 1 FROM customers "
                  "WHERE customers.cid = orders.buyer AND name LIKE '%QQ%' AND region = 'Yukon')"),
]


@pytest.mark.parametrize(("gold", "rewrite"), EQUIVALENT)
def test_the_gold_and_equivalent_rewrites_pass_every_suite_database(gold, rewrite) -> None:
    assert _scores(gold, [gold, rewrite]) == [True, True]
