"""The SQLite sandbox: context building (with transpilation), results, DML snapshots, hostile SQL."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from job.evaluation.sandbox import Limits, build_context, split_statements

CONTEXT = "CREATE TABLE t (a INT, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y;z'), (3, 'z');"
TIMEOUT = 0.5
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"


@pytest.fixture
def context():
    built = build_context(CONTEXT, Limits(timeout_s=TIMEOUT, max_rows=100))
    yield built
    built.close()


def run(context, sql: str):
    with context.fresh() as db:
        return db.run_query(sql)


def test_split_statements_respects_strings_comments_and_triggers() -> None:
    script = (
        "CREATE TABLE t (a TEXT); -- note; not a statement\n"
        "INSERT INTO t VALUES ('a;b');\n"
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'c'; END;\n"
        "/* only a comment; */ ;  ;\n"
        "SELECT a FROM t"
    )
    assert split_statements(script) == [
        "CREATE TABLE t (a TEXT);",
        "-- note; not a statement\nINSERT INTO t VALUES ('a;b');",
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'c'; END;",
        "SELECT a FROM t",
    ]
    assert split_statements("  -- nothing\n ; ") == []


def test_query_returns_rows_columns_and_each_copy_is_fresh(context) -> None:
    result = run(context, "SELECT b, a FROM t WHERE a > 1 ORDER BY a")
    assert result.ok and result.rows == [("y;z", 2), ("z", 3)] and result.columns == ["b", "a"]
    assert run(context, "DELETE FROM t").ok
    assert run(context, "SELECT count(*) FROM t").rows == [(3,)]  # the delete ran on another copy


def test_dml_returns_table_contents(context) -> None:
    result = run(context, "UPDATE t SET b = 'q' WHERE a = 2; INSERT INTO t VALUES (4, 'w')")
    assert result.ok and result.rows is None
    assert result.tables == {"t": (("a", "b"), [(1, "x"), (2, "q"), (3, "z"), (4, "w")])}
    last_decides = run(context, "SELECT 1; UPDATE t SET a = 0")
    assert last_decides.tables["t"][1][0] == (0, "x")


def test_context_statements_are_transpiled_when_sqlite_rejects_them() -> None:
    built = build_context("CREATE TABLE t (id INT, name TEXT) ENGINE=InnoDB; INSERT INTO t VALUES (1, 'a');")
    try:
        assert built.error is None
        assert len(built.transpiled) == 1 and "ENGINE" not in built.transpiled[0]
        assert run(built, "SELECT name FROM t").rows == [("a",)]
    finally:
        built.close()


def test_unbuildable_context_is_reported() -> None:
    built = build_context("CREATE SCHEMA s; CREATE TABLE s.t (a INT); CREATE TABLE v (a INT, a INT); "
                          "CREATE TABLE u (a INT);")
    try:
        assert built.skipped == ["CREATE SCHEMA s;"]
        assert built.transpiled == ["CREATE TABLE t (a INTEGER)"]  # schema prefix mapped to a plain table
        assert built.error and "CREATE TABLE v" in built.error
        assert run(built, "SELECT * FROM u").ok and run(built, "SELECT * FROM t").ok  # the rest was still built
    finally:
        built.close()


def test_errors_are_reported_not_raised(context) -> None:
    assert "no such table" in run(context, "SELECT * FROM missing").error
    assert run(context, "").error == "empty query"
    assert run(context, "-- just a comment").error == "empty query"
    big = run(context, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 101) "
                       "SELECT x FROM c")
    assert "more than 100 rows" in big.error


@pytest.mark.parametrize(
    ("name", "sql", "expected"),
    [
        ("attach", "ATTACH DATABASE '{tmp}/evil.db' AS evil; CREATE TABLE evil.x (a INT)", "not authorized"),
        ("attach_relative", "ATTACH 'evil2.db' AS e", "not authorized"),
        ("vacuum_into", "VACUUM INTO '{tmp}/copy.db'", "authorization denied"),
        ("vacuum", "VACUUM", "authorization denied"),
        ("detach", "DETACH DATABASE main", "not authorized"),
        ("pragma_write", "PRAGMA writable_schema = ON", "not authorized"),
        ("pragma_heap", "PRAGMA hard_heap_limit = 0", "not authorized"),
        ("pragma_function", "SELECT * FROM pragma_table_info('t')", "not authorized"),
        ("load_extension", "SELECT load_extension('{tmp}/x.so')", "not authorized"),
        ("recursive_cte", f"{ENDLESS} SELECT count(*) FROM c", "timeout"),
        ("cross_join", "SELECT count(*) FROM " + ", ".join(f"t t{i}" for i in range(20)), "timeout"),
        ("huge_blob", "SELECT length(randomblob(2000000000))", "too big"),
        ("many_statements", "SELECT 1;" * 2_000, "more than 64 statements"),
        ("long_script", "SELECT 1;" * 20_000, "longer than"),
        ("unclosed_string", "SELECT '" + ";" * 50_000, "statements"),
        ("endless_table", f"CREATE TABLE big AS {ENDLESS} SELECT randomblob(1000) FROM c", ""),
    ],
)
@pytest.mark.timeout(30)  # a sandbox regression must fail, not hang CI
def test_hostile_sql_fails_fast_and_touches_nothing(context, tmp_path, monkeypatch, name, sql, expected):
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(Path(__file__).parents[1]))
    start = time.monotonic()
    result = run(context, sql.replace("{tmp}", str(tmp_path)))
    elapsed = time.monotonic() - start
    assert not result.ok and expected in result.error, (name, result.error)
    assert elapsed < TIMEOUT + 1.0, (name, elapsed)
    assert list(tmp_path.iterdir()) == []
    assert set(os.listdir(Path(__file__).parents[1])) == before
    assert run(context, "SELECT count(*) FROM t").rows == [(3,)]  # the template is untouched
