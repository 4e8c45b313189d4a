"""Make SQL written for MySQL, Postgres or T-SQL run in SQLite without changing what it means.

Two tools, both deterministic:

- `register_functions`: MySQL-style scalar functions SQLite lacks (`YEAR`, `MONTH`, `DATEDIFF`, `NOW`, ...),
  registered on a sandbox connection. "Now" is a fixed instant (`evaluation.fixed_now`), so a query about
  "the last 6 months" gives the same answer on every machine and every day.
- `sqlite_rewrites`: candidate SQLite texts for a statement, as written first, then through `sqlglot.transpile`
  from each source dialect plus AST fixes sqlglot leaves out: `EXTRACT(part FROM x)`, `x +/- INTERVAL n unit`,
  weeks and quarters in `DATE_ADD`/`DATEADD` (as days and months: SQLite has neither),
  `CURRENT_DATE`/`CURRENT_TIMESTAMP`/`date('now')` pinned to the fixed now, and schema-qualified names
  (`sales.orders`) mapped to plain tables (SQLite has no schemas; `CREATE SCHEMA` is a no-op in the sandbox).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import sqlite3
import typing
from collections.abc import Iterator
from typing import Any

DEFAULT_NOW = "2024-01-15 12:00:00"
SOURCE_DIALECTS = ("mysql", "postgres", "tsql", "duckdb")
_NOW_WORDS = re.compile(r"\b(current_date|current_timestamp|current_time|localtime|now)\b|'now'", re.I)
_READS_CLOCK = re.compile(r"\b(current_date|current_timestamp|current_time|localtime)\b|'now'", re.I)
_DATE_PREFIX = re.compile(r"^\s*(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2}))?)?")
_EXTRACT_FORMATS = {"YEAR": "%Y", "MONTH": "%m", "DAY": "%d", "HOUR": "%H", "MINUTE": "%M", "SECOND": "%S"}
_SQLITE_DATE_FUNCTIONS = frozenset({"DATE", "DATETIME", "TIME", "JULIANDAY", "STRFTIME", "UNIXEPOCH"})
_INTERVAL_UNITS = {"YEAR": "year", "MONTH": "month", "DAY": "day", "HOUR": "hour", "MINUTE": "minute",
                   "SECOND": "second", "WEEK": "week", "QUARTER": "quarter"}


def _parse_datetime(value: object) -> dt.datetime | None:
    if value is None:
        return None
    match = _DATE_PREFIX.match(str(value))
    if not match:
        return None
    parts = [int(p) if p else 0 for p in match.groups()]
    try:
        return dt.datetime(*parts)
    except ValueError:
        return None


def _part(getter: Any) -> Any:
    def function(value: object) -> int | None:
        parsed = _parse_datetime(value)
        return None if parsed is None else getter(parsed)

    return function


def _datediff(end: object, start: object) -> int | None:
    """MySQL DATEDIFF(end, start): whole days between the date parts."""
    a, b = _parse_datetime(end), _parse_datetime(start)
    return None if a is None or b is None else (a.date() - b.date()).days


def _concat(*values: object) -> str | None:
    """MySQL CONCAT: NULL if any argument is NULL."""
    if any(v is None for v in values):
        return None
    return "".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values)


def _timestampdiff(unit: object, start: object, end: object) -> int | None:
    """MySQL TIMESTAMPDIFF(unit, start, end): whole units from start to end."""
    a, b = _parse_datetime(start), _parse_datetime(end)
    if a is None or b is None or not isinstance(unit, str):
        return None
    unit = unit.upper()
    if unit in ("YEAR", "QUARTER", "MONTH"):
        months = (b.year - a.year) * 12 + b.month - a.month
        if months > 0 and (b.day, b.time()) < (a.day, a.time()):
            months -= 1
        elif months < 0 and (b.day, b.time()) > (a.day, a.time()):
            months += 1
        return int(months / {"YEAR": 12, "QUARTER": 3, "MONTH": 1}[unit])
    seconds = {"WEEK": 604800, "DAY": 86400, "HOUR": 3600, "MINUTE": 60, "SECOND": 1}.get(unit)
    return None if seconds is None else int((b - a).total_seconds() / seconds)


_MYSQL_FORMATS = {"%Y": "%Y", "%y": "%y", "%m": "%m", "%c": "%m", "%d": "%d", "%e": "%d", "%H": "%H", "%i": "%M",
                  "%s": "%S", "%S": "%S", "%M": "%B", "%b": "%b", "%T": "%H:%M:%S"}


def _str_to_date(text: object, mysql_format: object) -> str | None:
    """MySQL STR_TO_DATE: the date as 'YYYY-MM-DD[ HH:MM:SS]', NULL when the text does not fit the format."""
    if text is None or not isinstance(mysql_format, str):
        return None
    python_format = re.sub(r"%.", lambda m: _MYSQL_FORMATS.get(m.group(0), m.group(0)), mysql_format)
    try:
        parsed = dt.datetime.strptime(str(text), python_format)
    except ValueError:
        return None
    has_time = any(code in mysql_format for code in ("%H", "%i", "%s", "%S", "%T"))
    return parsed.strftime("%Y-%m-%d %H:%M:%S" if has_time else "%Y-%m-%d")


class _Correlation:
    """CORR(x, y): Pearson's r (statistics.correlation) over rows where both are numbers; NULL when undefined."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []

    def step(self, x: object, y: object) -> None:
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            self.pairs.append((float(x), float(y)))

    def finalize(self) -> float | None:
        import statistics

        try:
            return statistics.correlation(*zip(*self.pairs, strict=True)) if len(self.pairs) >= 2 else None
        except statistics.StatisticsError:
            return None


def register_functions(conn: sqlite3.Connection, now: str) -> None:
    """Deterministic MySQL-compatible functions; `now` ('YYYY-MM-DD HH:MM:SS') answers NOW(), CURDATE(), ..."""
    today = now[:10]
    functions: list[tuple[str, int, Any]] = [
        ("YEAR", 1, _part(lambda d: d.year)),
        ("MONTH", 1, _part(lambda d: d.month)),
        ("DAY", 1, _part(lambda d: d.day)),
        ("DAYOFMONTH", 1, _part(lambda d: d.day)),
        ("QUARTER", 1, _part(lambda d: (d.month - 1) // 3 + 1)),
        ("HOUR", 1, _part(lambda d: d.hour)),
        ("MINUTE", 1, _part(lambda d: d.minute)),
        ("DATEDIFF", 2, _datediff),
        ("NOW", 0, lambda: now),
        ("SYSDATE", 0, lambda: now),
        ("GETDATE", 0, lambda: now),
        ("CURDATE", 0, lambda: today),
        ("CONCAT", -1, _concat),
        ("TIMESTAMPDIFF", 3, _timestampdiff),
        ("STR_TO_DATE", 2, _str_to_date),
    ]
    for name, n_args, function in functions:
        conn.create_function(name, n_args, function, deterministic=True)
    for name in ("CORR", "CORRELATION"):
        conn.create_aggregate(name, 2, _Correlation)


def mentions_now(sql: str) -> bool:
    return bool(_NOW_WORDS.search(sql))


def sqlite_rewrites(sql: str, now: str, *, as_written: bool = True) -> Iterator[tuple[str, bool]]:
    """(SQLite text, rewritten?) candidates for `sql`, best first, each distinct; computed lazily and memoized
    (a gold and a prediction are often the same text, and rescoring repeats them)."""
    return iter(_memoized_rewrites(sql, now, as_written))


class _Memo:
    """A generator's items, produced once on demand and replayed to every later reader."""

    def __init__(self, items: Iterator[tuple[str, bool]]) -> None:
        self._items, self._seen = items, []

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        index = 0
        while True:
            if index == len(self._seen):
                try:
                    self._seen.append(next(self._items))
                except StopIteration:
                    return
            yield self._seen[index]
            index += 1


@functools.lru_cache(maxsize=4096)
def _memoized_rewrites(sql: str, now: str, as_written: bool) -> _Memo:
    return _Memo(_rewrites(sql, now, as_written=as_written))


def _rewrites(sql: str, now: str, *, as_written: bool = True) -> Iterator[tuple[str, bool]]:
    """See `sqlite_rewrites`.

    As written comes first, except that SQL mentioning the current date or time is always pinned to `now`
    (SQLite's own `CURRENT_DATE` reads the clock). Then one candidate per source dialect (`SOURCE_DIALECTS`),
    and the MySQL one again with every identifier quoted (for names SQLite reserves, e.g. `transaction`).
    """
    import sqlglot

    from job.evaluation.sandbox import quiet_sqlglot

    seen: set[str] = set()
    pinned = mentions_now(sql)
    if as_written and not pinned:
        seen.add(sql)
        yield sql, False
    attempts = [("sqlite", False)] if pinned else []
    attempts += [(dialect, False) for dialect in SOURCE_DIALECTS] + [("mysql", True)]
    for dialect, identify in attempts:
        try:
            with quiet_sqlglot():
                expressions = [e for e in sqlglot.parse(sql, read=dialect) if e is not None]
                text = ";\n".join(
                    fix_for_sqlite(e, now).sql(dialect=_backtick_sqlite(), identify=identify) for e in expressions
                )
        except Exception:  # sqlglot fails in many ways on odd SQL (RecursionError on deep nesting, ...)
            continue
        if text and text not in seen and not _READS_CLOCK.search(text):
            seen.add(text)
            yield text, text.strip().rstrip(";") != sql.strip().rstrip(";")
    if sql not in seen:  # pinned SQL that no dialect parses: run it as written, for its error message
        yield sql, False


@functools.cache
def _backtick_sqlite() -> Any:
    """SQLite, writing quoted identifiers in backticks: SQLite reads an unknown "name" as the string 'name',
    which would turn a wrong column into a constant; an unknown `name` stays an error."""
    from sqlglot.dialects.sqlite import SQLite

    class BacktickSQLite(SQLite):
        class Tokenizer(SQLite.Tokenizer):
            IDENTIFIERS: typing.ClassVar = ["`"]

    return BacktickSQLite


def fix_for_sqlite(expression: Any, now: str) -> Any:
    """The AST rewrites sqlglot's SQLite generator does not do (see the module docstring).

    Two passes: names and clock readings first, so that the date arithmetic built in the second pass only ever
    wraps the pinned "now"."""
    from sqlglot import exp

    def names_and_clock(node: Any) -> Any:
        if isinstance(node, exp.Table) or (isinstance(node, exp.Column) and node.args.get("db") is not None):
            node.set("db", None)
            node.set("catalog", None)
        elif isinstance(node, exp.CurrentDate):
            return exp.Literal.string(now[:10])
        elif isinstance(node, (exp.CurrentTimestamp, exp.CurrentDatetime)):
            return exp.Literal.string(now)
        elif isinstance(node, exp.CurrentTime):
            return exp.Literal.string(now[11:])
        elif isinstance(node, exp.Literal) and node.is_string and node.this.lower() == "now" and _is_date_call(
            node.parent
        ):
            return exp.Literal.string(now)
        return node

    def functions(node: Any) -> Any:
        if isinstance(node, exp.Extract):
            return _extract(node)
        if isinstance(node, (exp.TimestampTrunc, exp.DateTrunc)):
            return _truncate(node)
        if isinstance(node, exp.TimestampDiff) and node.args.get("unit") is not None:
            # MySQL TIMESTAMPDIFF(unit, start, end); sqlglot's SQLite output drops the unit's meaning
            return exp.Anonymous(this="TIMESTAMPDIFF", expressions=[
                exp.Literal.string(node.args["unit"].name.upper()), node.expression, node.this])
        if isinstance(node, exp.StrToDate) and node.args.get("format") is not None:
            return exp.Anonymous(this="STR_TO_DATE", expressions=[node.this, node.args["format"]])
        if isinstance(node, (exp.Add, exp.Sub)) and isinstance(node.expression, exp.Interval):
            return _shift(node)
        if isinstance(node, (exp.DateAdd, exp.DateSub, exp.DatetimeAdd, exp.DatetimeSub, exp.TsOrDsAdd)):
            return _weeks_and_quarters(node)
        return node

    return expression.transform(names_and_clock, copy=True).transform(functions, copy=False)


def _extract(node: Any) -> Any:
    from sqlglot import exp

    part = node.this.name.upper() if node.this is not None else ""
    value = node.expression
    if part in _EXTRACT_FORMATS:
        return exp.cast(exp.func("STRFTIME", exp.Literal.string(_EXTRACT_FORMATS[part]), value), "INTEGER")
    if part == "QUARTER":
        return exp.func("QUARTER", value)
    if part in ("DOW", "DAYOFWEEK", "DW", "WEEKDAY"):  # Postgres DOW: Sunday = 0; MySQL/T-SQL: Sunday = 1
        weekday = exp.cast(exp.func("STRFTIME", exp.Literal.string("%w"), value), "INTEGER")
        return weekday if part == "DOW" else exp.Paren(this=exp.Add(this=weekday, expression=exp.Literal.number(1)))
    return node


def _is_date_call(node: Any) -> bool:
    """A call of one of SQLite's date functions, whose 'now' argument means the clock."""
    from sqlglot import exp

    if not isinstance(node, exp.Func):
        return False
    return node.sql(dialect="sqlite").split("(")[0].upper() in _SQLITE_DATE_FUNCTIONS


def _truncate(node: Any) -> Any:
    """DATE_TRUNC(unit, x) for day, week (to Monday, as Postgres), month and year; other units unchanged."""
    from sqlglot import exp

    unit = (node.args.get("unit").name if node.args.get("unit") is not None else "").upper().strip("'")
    modifiers = {"DAY": [], "WEEK": ["-6 days", "weekday 1"], "MONTH": ["start of month"],
                 "YEAR": ["start of year"]}.get(unit)
    if modifiers is None:
        return node
    return exp.func("DATE", node.this, *(exp.Literal.string(m) for m in modifiers))


def _shift(node: Any) -> Any:
    """`x + INTERVAL n unit` -> DATETIME(x, '+n unit') (DATE(...) when x is a date without time)."""
    from sqlglot import exp

    interval = node.expression
    unit = _INTERVAL_UNITS.get((interval.unit.name if interval.args.get("unit") else "DAY").upper())
    amount = interval.this
    if unit is None or not isinstance(amount, exp.Literal):
        return node
    try:
        number = float(amount.this)
    except ValueError:
        return node
    if unit in ("week", "quarter"):
        number, unit = (number * 7, "day") if unit == "week" else (number * 3, "month")
    sign = -1 if isinstance(node, exp.Sub) else 1
    text = f"{sign * number:+g} {unit}"
    has_time = unit in ("hour", "minute", "second") or _has_time(node.this)
    return exp.func("DATETIME" if has_time else "DATE", node.this, exp.Literal.string(text))


def _weeks_and_quarters(node: Any) -> Any:
    """DATE_ADD(x, INTERVAL n WEEK/QUARTER) and DATEADD(week/quarter, n, x) as 7n days / 3n months: SQLite's date
    modifiers have no week or quarter, and sqlglot writes them as they are (`DATE(x, '1 WEEK')` is NULL)."""
    from sqlglot import exp

    holder = node.expression if isinstance(node.expression, exp.Interval) else node
    amount_key = "this" if holder is not node else "expression"
    unit, amount = holder.args.get("unit"), holder.args.get(amount_key)
    factor, target = {"WEEK": (7, "DAY"), "QUARTER": (3, "MONTH")}.get(unit.name.upper() if unit else "", (0, ""))
    sign = -1 if isinstance(amount, exp.Neg) else 1
    literal = amount.this if isinstance(amount, exp.Neg) else amount
    if not factor or not isinstance(literal, exp.Literal):
        return node
    try:
        number = float(literal.this) * sign * factor
    except ValueError:
        return node
    holder.set(amount_key, exp.Literal.number(int(number) if number.is_integer() else number))
    holder.set("unit", exp.var(target))
    return node


def _has_time(value: Any) -> bool:
    from sqlglot import exp

    if isinstance(value, exp.Literal) and value.is_string:
        return len(value.this) > 10
    return isinstance(value, (exp.CurrentTimestamp, exp.CurrentDatetime)) or (
        isinstance(value, exp.Anonymous) and value.name.upper() in ("NOW", "GETDATE", "SYSDATE")
    )


def qualify_equijoined(sql: str, column: str) -> str | None:
    """Qualify the bare, ambiguous `column` when an inner join equates it across two tables (`a.x = b.x`).

    Both sides are equal in every joined row, so either is the column meant; MySQL and SQLite reject the query
    as written. None when there is no such join condition (then the ambiguity is real).
    """
    try:
        return _qualify_equijoined(sql, column.lower())
    except Exception:  # sqlglot fails in many ways on odd SQL (RecursionError on deep nesting, ...): no rewrite
        return None


def _qualify_equijoined(sql: str, name: str) -> str | None:
    import sqlglot
    from sqlglot import exp

    from job.evaluation.sandbox import quiet_sqlglot

    with quiet_sqlglot():
        tree = sqlglot.parse_one(sql, read="sqlite")
    changed = False
    for select in tree.find_all(exp.Select):
        qualifier = None
        for join in select.args.get("joins") or []:
            if join.side or (join.kind or "").upper() not in ("", "INNER"):
                continue
            for condition in (join.args.get("on") or exp.Null()).find_all(exp.EQ):
                left, right = condition.this, condition.expression
                if isinstance(left, exp.Column) and isinstance(right, exp.Column) and left.table and right.table \
                        and left.name.lower() == right.name.lower() == name:
                    qualifier = qualifier or left.table
        if qualifier is None:
            continue
        for node in select.find_all(exp.Column):
            if not node.table and node.name.lower() == name and node.find_ancestor(exp.Select) is select:
                node.set("table", exp.to_identifier(qualifier))
                changed = True
    return tree.sql(dialect=_backtick_sqlite()) if changed else None
