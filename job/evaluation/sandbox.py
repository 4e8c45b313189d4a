"""SQLite sandbox: build a row's database from its `sql_context` and run untrusted SQL against it.

Every database lives in memory. Each connection is hardened before any SQL runs: an authorizer denies ATTACH
and DETACH (which also blocks `VACUUM` and `VACUUM INTO 'file'`), every PRAGMA, virtual tables and
file-touching functions; extension loading is off; a progress handler aborts work past a deadline; results are
capped in rows; size limits cap strings, SQL text and database pages; SQLite's process-wide heap gets a hard
limit. MySQL-compatible functions with a fixed "now" (`job.evaluation.compat`) are registered on every
connection.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from job.evaluation.compat import DEFAULT_NOW, register_functions, sqlite_rewrites
from job.train.preemption import raise_if_stopped

_PAGE_SIZE = 4096
_PROGRESS_EVERY = 2_000  # VM instructions between deadline checks
_DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})
_DENIED_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_ATTACH,
        sqlite3.SQLITE_DETACH,
        sqlite3.SQLITE_PRAGMA,
        sqlite3.SQLITE_CREATE_VTABLE,
        sqlite3.SQLITE_DROP_VTABLE,
    }
)
_heap_limit_applied = False


@dataclass(frozen=True)
class Limits:
    """Resource caps for one query (all statements of it together) or one context build."""

    timeout_s: float = 2.0
    max_rows: int = 10_000
    max_statements: int = 64
    max_sql_chars: int = 100_000
    max_parse_chars: int = 10_000
    """SQL longer than this (at most max_sql_chars) runs as written only: sqlglot, whose time grows faster than
    the text, neither rewrites nor normalizes it."""
    max_value_bytes: int = 10_000_000
    max_columns: int = 256
    max_db_bytes: int = 256 * 2**20
    heap_limit_bytes: int = 512 * 2**20
    """Process-wide (SQLite's `hard_heap_limit`); only ever lowered, never raised."""
    fixed_now: str = DEFAULT_NOW
    """What NOW(), CURDATE(), CURRENT_DATE and date('now') return ('YYYY-MM-DD HH:MM:SS')."""


@dataclass
class QueryResult:
    """Outcome of `run_query`: `rows` when the last statement returned a result set, else `tables`."""

    rows: list[tuple] | None = None
    columns: list[str] = field(default_factory=list)
    tables: dict[str, tuple[tuple[str, ...], list[tuple]]] | None = None
    error: str | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class _Guard:
    """Authorizer and deadline shared by one connection."""

    def __init__(self) -> None:
        self.deadline = float("inf")

    def authorize(self, action: int, _arg1: object, arg2: str | None, _db: object, _source: object) -> int:
        if action in _DENIED_ACTIONS:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def progress(self) -> int:
        return 1 if time.monotonic() > self.deadline else 0


class SandboxDB:
    """One hardened in-memory connection. Use `run_query` on it; close it when done."""

    def __init__(self, limits: Limits, source: sqlite3.Connection | None = None) -> None:
        self.limits = limits
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        if source is not None:
            source.backup(self.conn)
        self._guard = _Guard()
        _harden(self.conn, limits, self._guard)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SandboxDB:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def run_query(self, sql: str) -> QueryResult:
        """Run `sql` (one or more statements) within the limits; never raises for SQL problems."""
        start = time.monotonic()
        self._guard.deadline = start + self.limits.timeout_s
        try:
            result = self._run(sql)
        except (sqlite3.Error, sqlite3.Warning, MemoryError, OverflowError, ValueError) as exc:
            result = QueryResult(error=_describe(exc, self._guard))
        finally:
            self._guard.deadline = float("inf")
            if self.conn.in_transaction:
                _quietly(lambda: self.conn.execute("ROLLBACK"))
        raise_if_stopped()  # a SIGTERM that arrived inside one of SQLite's Python callbacks only stopped the query
        result.elapsed_s = time.monotonic() - start
        return result

    def _run(self, sql: str) -> QueryResult:
        if len(sql) > self.limits.max_sql_chars:
            return QueryResult(error=f"query longer than {self.limits.max_sql_chars} characters")
        if (problem := text_problem(sql)) is not None:
            return QueryResult(error=f"query {problem}")
        if sql.count(";") > self.limits.max_statements * 16:
            return QueryResult(error=f"more than {self.limits.max_statements} statements")
        statements = split_statements(sql)
        if not statements:
            return QueryResult(error="empty query")
        if len(statements) > self.limits.max_statements:
            return QueryResult(error=f"more than {self.limits.max_statements} statements")
        cursor = self.conn.cursor()
        for index, statement in enumerate(statements, start=1):
            cursor.execute(statement)
            if cursor.description is not None and index < len(statements):
                self._fetch(cursor)  # run earlier SELECTs to completion, within the caps
        if cursor.description is not None:
            return QueryResult(rows=self._fetch(cursor), columns=[d[0] for d in cursor.description])
        return QueryResult(tables=self.snapshot())

    def _fetch(self, cursor: sqlite3.Cursor) -> list[tuple]:
        rows: list[tuple] = []
        while batch := cursor.fetchmany(500):
            rows.extend(batch)
            if len(rows) > self.limits.max_rows:
                raise OverflowError(f"result has more than {self.limits.max_rows} rows")
        return rows

    def snapshot(self) -> dict[str, tuple[tuple[str, ...], list[tuple]]]:
        """Every table and view: lower-cased name -> (column names, rows)."""
        names = self.conn.execute(
            "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        tables = {}
        for (name,) in names:
            try:
                cursor = self.conn.execute(f"SELECT * FROM {quote_identifier(name)}")
            except sqlite3.OperationalError as exc:  # e.g. a view over a missing table
                tables[name.lower()] = (("<error>",), [(str(exc),)])
                continue
            columns = tuple(d[0].lower() for d in cursor.description)
            tables[name.lower()] = (columns, self._fetch(cursor))
        return tables

    def schema(self) -> dict[str, dict[str, str]]:
        """Table/view -> {column: declared type}, for sqlglot's `qualify`; unreadable views are left out."""
        names = self.conn.execute("SELECT name FROM sqlite_schema WHERE type IN ('table', 'view')").fetchall()
        found = {}
        for (name,) in names:
            try:
                cursor = self.conn.execute(f"SELECT * FROM {quote_identifier(name)} LIMIT 0")
            except sqlite3.OperationalError:
                continue
            found[name] = {d[0]: "TEXT" for d in cursor.description}
        return found


@dataclass
class ContextDB:
    """A row's `sql_context` built once; `fresh()` hands out independent hardened copies."""

    template: SandboxDB
    transpiled: list[str] = field(default_factory=list)
    """Statements that only ran after `sqlglot.transpile` to SQLite (as rewritten)."""
    skipped: list[str] = field(default_factory=list)
    """`CREATE SCHEMA` statements: SQLite has no schemas, so they are no-ops here."""
    error: str | None = None
    """Why part of the context could not be built (None when every statement ran)."""

    def fresh(self) -> SandboxDB:
        return SandboxDB(self.template.limits, source=self.template.conn)

    def close(self) -> None:
        self.template.close()


def build_context(context: str, limits: Limits | None = None) -> ContextDB:
    """Run a CREATE/INSERT script statement by statement, transpiling statements SQLite rejects as written."""
    limits = limits or Limits()
    db = SandboxDB(limits)
    built = ContextDB(template=db)
    if len(context) > limits.max_sql_chars:
        built.error = f"context longer than {limits.max_sql_chars} characters"
        return built
    if (problem := text_problem(context)) is not None:
        built.error = f"text {problem}"
        return built
    statements = split_statements(context)
    errors = []
    db._guard.deadline = time.monotonic() + limits.timeout_s * 5
    try:
        for statement in statements:
            problem = _execute_one(db, statement)
            if problem is None:
                continue
            if len(statement) > limits.max_parse_chars:
                errors.append(f"{problem} in: {_clip(statement)}")
                continue
            if _is_create_schema(statement):
                built.skipped.append(statement)
                continue
            rewritten = _transpile_and_run(db, statement)
            if rewritten is None:
                errors.append(f"{problem} in: {_clip(statement)}")
            else:
                built.transpiled.append(rewritten)
    finally:
        db._guard.deadline = float("inf")
    built.error = "; ".join(errors) or None
    return built


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements using SQLite's own tokenizer (`sqlite3.complete_statement`).

    Text SQLite cannot take (see `text_problem`) stays one statement, for its execution to report."""
    if text_problem(sql) is not None:
        return [sql.strip()] if sql.strip() else []
    return list(_split_statements(sql))


def text_problem(text: str) -> str | None:
    """Why SQLite cannot take `text` as SQL at all (a NUL character, a lone surrogate), or None."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode (lone surrogate {text[exc.start]!r} at character {exc.start})"
    return None


@functools.lru_cache(maxsize=4096)
def _split_statements(sql: str) -> tuple[str, ...]:
    """Cached: a suite runs the same gold and neighbour texts on many databases."""
    statements, buffer = [], ""
    *pieces, tail = sql.split(";")
    for piece in pieces:
        buffer = f"{buffer};{piece}" if buffer else piece
        if sqlite3.complete_statement(buffer + ";"):
            if _has_code(buffer):
                statements.append(buffer.strip() + ";")
            buffer = ""
    buffer = f"{buffer};{tail}" if buffer else tail
    if _has_code(buffer):
        statements.append(buffer.strip())
    return tuple(statements)


@contextlib.contextmanager
def quiet_sqlglot() -> Iterator[None]:
    """Silence sqlglot's warnings (e.g. 'falling back to parsing as a Command') while parsing model output."""
    logger = logging.getLogger("sqlglot")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _has_code(text: str) -> bool:
    """False for text that holds only whitespace, comments and semicolons."""
    if not text.strip():
        return False
    if "--" not in text and "/*" not in text:
        return bool(text.strip(" \t\r\n\f\v;"))
    import sqlglot.tokens

    try:
        tokens = sqlglot.tokens.Tokenizer().tokenize(text)
    except Exception:  # sqlglot fails in many ways on odd text; SQLite has the last word
        return True
    return any(token.token_type != sqlglot.tokens.TokenType.SEMICOLON for token in tokens)


def _execute_one(db: SandboxDB, statement: str) -> str | None:
    try:
        db.conn.execute(statement)
    except (sqlite3.Error, sqlite3.Warning, MemoryError, OverflowError, ValueError) as exc:
        if db.conn.in_transaction:
            _quietly(lambda: db.conn.execute("ROLLBACK"))
        raise_if_stopped()
        return _describe(exc, db._guard)
    return None


def _is_create_schema(statement: str) -> bool:
    import sqlglot
    from sqlglot import exp

    if not re.search(r"\bSCHEMA\b", statement, re.I):
        return False
    try:
        with quiet_sqlglot():
            parsed = sqlglot.parse_one(statement)
    except Exception:  # sqlglot fails in many ways on odd SQL (RecursionError on deep nesting, ...)
        return False
    if isinstance(parsed, exp.Create):
        return str(parsed.args.get("kind") or "").upper() == "SCHEMA"
    return isinstance(parsed, exp.Command) and parsed.name.upper() == "CREATE" and \
        str(parsed.expression or "").strip().upper().startswith("SCHEMA")


def _transpile_and_run(db: SandboxDB, statement: str) -> str | None:
    """Run the first rewrite of `statement` (see `compat.sqlite_rewrites`) that SQLite accepts; None if none."""
    for text, _ in sqlite_rewrites(statement, db.limits.fixed_now, as_written=False):
        parts = split_statements(text)
        if parts and all(_execute_one(db, part) is None for part in parts):
            return text
    return None


def _harden(conn: sqlite3.Connection, limits: Limits, guard: _Guard) -> None:
    global _heap_limit_applied
    if hasattr(conn, "enable_load_extension"):
        conn.enable_load_extension(False)
    if not _heap_limit_applied:
        (current,) = conn.execute("PRAGMA hard_heap_limit").fetchone()
        if current == 0 or current > limits.heap_limit_bytes:
            conn.execute(f"PRAGMA hard_heap_limit = {int(limits.heap_limit_bytes)}")
        _heap_limit_applied = True
    pages = max(64, limits.max_db_bytes // _PAGE_SIZE)
    for pragma in ("temp_store = MEMORY", "trusted_schema = OFF", f"max_page_count = {pages}",
                   f"temp.max_page_count = {pages}"):
        conn.execute(f"PRAGMA {pragma}")
    if hasattr(conn, "setlimit"):
        for limit, value in (
            ("SQLITE_LIMIT_ATTACHED", 0),
            ("SQLITE_LIMIT_COLUMN", limits.max_columns),
            ("SQLITE_LIMIT_LENGTH", limits.max_value_bytes),
            ("SQLITE_LIMIT_SQL_LENGTH", limits.max_sql_chars * 4 + 1000),
            ("SQLITE_LIMIT_WORKER_THREADS", 0),
            ("SQLITE_LIMIT_TRIGGER_DEPTH", 100),
        ):
            conn.setlimit(getattr(sqlite3, limit), value)
    register_functions(conn, limits.fixed_now)
    conn.set_authorizer(guard.authorize)
    conn.set_progress_handler(guard.progress, _PROGRESS_EVERY)


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _describe(exc: BaseException, guard: _Guard) -> str:
    if time.monotonic() > guard.deadline or "interrupted" in str(exc):
        return "timeout: query ran past the time limit"
    if isinstance(exc, MemoryError):
        return "out of memory: query exceeded the memory limit"
    return f"{type(exc).__name__}: {exc}"


def _clip(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quietly(action: Callable[[], object]) -> None:
    with contextlib.suppress(sqlite3.Error):
        action()
