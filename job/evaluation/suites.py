"""Database test suites (Zhong, Yu & Klein, EMNLP 2020): more databases of a row's schema, kept when they matter.

For a row, `distill` generates candidate databases of the same schema as its `sql_context` and keeps those that
tell the gold query apart from one of its wrong neighbours (`job.evaluation.mutations`) not yet told apart,
until all are, the suite is full (`evaluation.test_suite_size`) or the candidate budget is spent. A prediction
is then correct only if it matches the gold on the row's own database and on every suite database.

Candidate databases are filled from the schema (sqlglot: column types, PRIMARY KEY/UNIQUE, NOT NULL; columns
with the same name in several tables draw from one pool, so joins find partners) with: the context's own values,
the gold's literals (and values its column-free operands evaluate to, e.g. "a year before now"), neighbouring
values (+/-1, +/-1 day/month/year, case and suffix variants), a few random ones, NULLs where allowed, repeats
(small per-database pools, so GROUP BY, DISTINCT and ties matter), and sometimes empty tables; in turn with
witness databases (`job.evaluation.witnesses`), built to satisfy the gold's filters, joins and group sizes.

A suite must also hold against predictions that ignore the question. Some database must give the gold an answer
no constant guesses (rows with a value other than NULL, 0 or ''; for DML, a change): when the row's own database
does not, witnesses are tried first (at most `WITNESS_TRIES`, each checked by running the gold). And some database
must give an answer other than the own database's, else a query returning that answer as literals would pass.
A row where either cannot be had is `Suite.trivial` (scored as usual, counted apart as `n_trivial`).

Everything is seeded by the row id and `evaluation.seed`, lives in memory, and runs on hardened sandbox
connections.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import random
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from job.evaluation.sandbox import ContextDB, Limits, QueryResult, SandboxDB, quiet_sqlglot, quote_identifier

_ROW_COUNTS = (0, 1, 2, 3, 3, 4, 5, 6, 8, 12, 20)
_SUBPOOL_SIZES = (1, 2, 2, 3, 4, 6, 10)
_FOCUS_BIAS = (0.0, 0.35, 0.9)
"""Per database, how often a filtered column holds only a value its filter selects (0.9: nearly all rows pass)."""
_EXTRA = {
    "int": [0, 1, 2, 3, 5, 10, 100],
    "real": [0.0, 1.5, 2.25, 10.0, 99.99],
    "text": ["", "alpha", "Beta", "zeta"],
    "bool": [0, 1],
    "date": ["2019-01-01", "2020-06-15", "2021-12-31", "2022-03-10", "2023-07-04"],
}
_NOW_OFFSETS_DAYS = (0, 1, 6, 7, 8, 29, 30, 31, 59, 61, 89, 90, 91, 92, 179, 181, 182, 183, 184, 364, 365, 366, 367,
                     730, 731, 1826)
WITNESS_TRIES = 12
"""Attempts at a witness database (`job.evaluation.witnesses`) per need, each checked by running the gold."""
_ID_LIKE = re.compile(r"id$", re.I)
ID_POOL = "<id>"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2})?")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str
    """int, real, text, bool, date or datetime."""
    not_null: bool = False
    key: bool = False
    """PRIMARY KEY or UNIQUE on its own."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[ColumnSpec, ...]


@dataclass
class Suite:
    """A row's distilled databases and the gold's result on each; the neighbour counts give its power."""

    databases: list[SandboxDB] = field(default_factory=list)
    gold: list[QueryResult] = field(default_factory=list)
    n_neighbours: int = 0
    """Neighbours of the gold that run on the row's own database."""
    rejected_single_db: int = 0
    """Of those, how many the row's own database tells apart from the gold."""
    rejected_suite: int = 0
    """How many the row's own database or some suite database tells apart."""
    candidates: int = 0
    survivors: list[str] = field(default_factory=list)
    """Neighbours no database told apart from the gold (equivalent to it, or too subtle for the budget)."""
    trivial: str | None = None
    """Why a prediction that ignores the question could match the gold on every database (own and suite), e.g.
    "empty result on every database"; None when some database gives an answer no constant guesses (`nontrivial`)
    and some database an answer other than the own database's."""

    def close(self) -> None:
        for db in self.databases:
            db.close()
        self.databases.clear()


def row_seed(row_id: object, seed: int) -> int:
    """A stable 64-bit seed for one row (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big")


def parse_schema(db: SandboxDB) -> list[TableSpec]:
    """Tables of a built database, with column kinds, keys and NOT NULL read by sqlglot from their CREATE text."""
    import sqlglot
    from sqlglot import exp

    tables = []
    found = db.conn.execute(
        "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    for name, create_sql in found:
        names = [d[0] for d in db.conn.execute(f"SELECT * FROM {quote_identifier(name)} LIMIT 0").description]
        specs: dict[str, ColumnSpec] = {n.lower(): ColumnSpec(n, "text") for n in names}
        try:
            with quiet_sqlglot():
                parsed = sqlglot.parse_one(create_sql or "", read="sqlite")
        except (sqlglot.errors.SqlglotError, ValueError):
            parsed = None
        schema = parsed.this if isinstance(parsed, exp.Create) else None
        for item in schema.expressions if isinstance(schema, exp.Schema) else []:
            if isinstance(item, exp.ColumnDef) and item.name.lower() in specs:
                kinds = [c.args.get("kind") for c in item.args.get("constraints") or []]
                specs[item.name.lower()] = ColumnSpec(
                    name=specs[item.name.lower()].name,
                    kind=_kind(item.args.get("kind")),
                    not_null=any(isinstance(k, (exp.NotNullColumnConstraint, exp.PrimaryKeyColumnConstraint))
                                 for k in kinds),
                    key=any(isinstance(k, (exp.PrimaryKeyColumnConstraint, exp.UniqueColumnConstraint))
                            for k in kinds),
                )
            elif isinstance(item, exp.PrimaryKey) and len(item.expressions) == 1:
                column = specs.get(item.expressions[0].name.lower())
                if column is not None:
                    specs[column.name.lower()] = ColumnSpec(column.name, column.kind, True, True)
        tables.append(TableSpec(name, tuple(specs[n.lower()] for n in names)))
    return tables


def _kind(data_type: Any) -> str:
    text = data_type.sql(dialect="sqlite").upper() if data_type is not None else ""
    if "BOOL" in text or text == "BIT":
        return "bool"
    if "INT" in text:
        return "int"
    if any(word in text for word in ("REAL", "FLOA", "DOUB", "DEC", "NUM", "MONEY")):
        return "real"
    if "DATETIME" in text or "TIMESTAMP" in text:
        return "datetime"
    if "DATE" in text:
        return "date"
    return "text"


class ValuePools:
    """Candidate values per column name, from the context, the gold's literals, neighbours and random values."""

    def __init__(self, tables: list[TableSpec], snapshot: dict[str, tuple], gold_sql: str, now: str,
                 limits: Limits) -> None:
        self.kinds: dict[str, str] = {}
        self.pools: dict[str, list[Any]] = {}
        self.focus: dict[str, list[Any]] = {}
        self.aliases: dict[str, str] = {}
        context: dict[str, list[Any]] = {}
        for table in tables:
            columns, rows = snapshot.get(table.name.lower(), ((), []))
            for index, column in enumerate(columns):
                context.setdefault(column, []).extend(row[index] for row in rows if row[index] is not None)
            for column in table.columns:
                self.kinds.setdefault(column.name.lower(), _refine(column.kind, context.get(column.name.lower())))
        tied, free = gold_values(gold_sql, limits)
        for name, kind in self.kinds.items():
            focus = [coerce(v, kind) for v in tied.get(name, [])]
            focus = [v for v in focus if v is not None]
            values = list(context.get(name, [])) + focus
            values += [v for v in (coerce(f, kind) for f in free) if v is not None]
            neighbours = [n for v in focus + list(context.get(name, []))[:6] for n in neighbour_values(v, kind)]
            extra = list(_EXTRA["date" if kind in ("date", "datetime") else kind])
            if kind in ("date", "datetime"):
                extra += _around_now(now)
                extra += [f"{y}-{md}" for y in years_of(free) for md in ("01-01", "06-15", "12-31")]
                if kind == "datetime":
                    extra = [f"{d} 12:00:00" if len(str(d)) == 10 else d for d in extra]
            self.focus[name] = _distinct(focus + [n for v in focus for n in neighbour_values(v, kind)])
            self.pools[name] = _distinct(values + neighbours + extra)
        # Integer id-like columns (id, dept_id, DeptID) share one pool, so joins across differently named keys match.
        id_like = sorted(n for n, k in self.kinds.items() if k == "int" and _ID_LIKE.search(n))
        if len(id_like) > 1:
            self.pools[ID_POOL] = _distinct([*[v for n in id_like for v in self.pools[n]][:40], 1, 2, 3, 4])
            self.focus[ID_POOL] = _distinct([v for n in id_like for v in self.focus[n]])
            for name in id_like:
                self.aliases[name] = ID_POOL

    def key(self, name: str) -> str:
        return self.aliases.get(name, name)

    def subpool(self, name: str, rng: random.Random, focus_bias: float) -> list[Any]:
        """A small pool for one column in one database: repeats make GROUP BY, DISTINCT and ties matter."""
        pool, focus = self.pools.get(name) or [None], self.focus.get(name) or []
        draw = rng.random()
        if focus and draw < focus_bias:
            return [rng.choice(focus)]  # every row passes this column's filter
        chosen = rng.sample(pool, min(len(pool), rng.choice(_SUBPOOL_SIZES)))
        if focus and draw < 0.8:
            chosen.append(rng.choice(focus))
        return chosen


def gold_values(sql: str, limits: Limits) -> tuple[dict[str, list[Any]], list[Any]]:
    """(column name -> values compared with it in `sql`, every literal of `sql`).

    A column-free operand of a comparison (e.g. `DATE('2024-01-15', '-1 year')`) is evaluated in the sandbox.
    """
    import sqlglot
    from sqlglot import exp

    try:
        with quiet_sqlglot():
            tree = sqlglot.parse_one(sql, read="sqlite")
    except (sqlglot.errors.SqlglotError, ValueError):
        return {}, []
    if tree is None:
        return {}, []
    free = [_literal(node) for node in tree.find_all(exp.Literal)]
    tied: dict[str, list[Any]] = {}
    comparisons = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike, exp.Between, exp.In)
    with SandboxDB(limits) as scratch:
        for node in tree.find_all(*comparisons):
            columns = {c.name.lower() for c in node.find_all(exp.Column)}
            if not columns:
                continue
            operands = [v for k, v in node.args.items() if k in ("expression", "low", "high") and v is not None]
            operands += list(node.args.get("expressions") or [])
            values: list[Any] = []
            for operand in operands:
                if isinstance(operand, exp.Literal):
                    values.append(_literal(operand))
                elif not any(True for _ in operand.find_all(exp.Column, exp.Select)):
                    result = scratch.run_query(f"SELECT {operand.sql(dialect='sqlite')}")
                    if result.ok and result.rows:
                        values.append(result.rows[0][0])
            if isinstance(node, (exp.Like, exp.ILike)):
                values = [w for v in values for w in _like_examples(str(v))]
            for column in columns:
                tied.setdefault(column, []).extend(v for v in values if v is not None)
    return tied, [v for v in free if v is not None]


def _literal(node: Any) -> Any:
    if node.is_string:
        return node.this
    try:
        number = float(node.this)
    except ValueError:
        return None
    return int(number) if number.is_integer() and "." not in node.this else number


def _like_examples(pattern: str) -> list[str]:
    core = pattern.replace("%", "").replace("_", "")
    examples = [core, f"a {core} b", f"{core} b", f"a {core}", core.upper(), core.lower()]
    return [e for e in examples if e] or [""]


def _refine(kind: str, values: list[Any] | None) -> str:
    """A TEXT column whose context values are all dates is a date column (and similarly for datetimes)."""
    strings = [v for v in values or [] if isinstance(v, str)]
    if kind in ("text", "date", "datetime") and strings:
        if all(_DATETIME.match(v) for v in strings):
            return "datetime"
        if all(_DATE.match(v) for v in strings):
            return "date"
    return kind


def coerce(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind in ("int", "bool"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        return None
    if kind == "real":
        return float(value) if isinstance(value, (int, float)) else None
    if kind in ("date", "datetime"):
        text = str(value)
        return text if _DATE.match(text[:10]) else None
    return value if isinstance(value, str) else None


def neighbour_values(value: Any, kind: str) -> list[Any]:
    """Values just around `value` (+/-1, +/-1 day/month/year, case and suffix variants), for boundaries."""
    if value is None:
        return []
    if kind in ("int", "bool") and isinstance(value, (int, float)):
        return [value - 1, value + 1]
    if kind == "real" and isinstance(value, (int, float)):
        return [value - 0.5, value + 0.5, round(value * 1.5, 2)]
    if kind in ("date", "datetime"):
        parsed = _date(str(value))
        if parsed is None:
            return []
        tail = str(value)[10:]
        shifted = [parsed + dt.timedelta(days=d) for d in (-1, 1, -31, 31, -366, 366)]
        return [f"{d.isoformat()}{tail}" for d in shifted]
    if kind == "text" and isinstance(value, str):
        variants = [f"{value}x", value.upper() if value != value.upper() else value.lower()]
        return variants + ([value[:-1]] if value else [])  # a prefix sorts just below the value
    return []


def _date(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text[:10])
    except ValueError:
        return None


def _around_now(now: str) -> list[str]:
    today = _date(now) or dt.date(2024, 1, 15)
    return [(today - dt.timedelta(days=d)).isoformat() for d in _NOW_OFFSETS_DAYS] + [
        (today + dt.timedelta(days=d)).isoformat() for d in (1, 30)
    ]


def years_of(values: list[Any]) -> list[int]:
    """Years a query names: integers 1900-2100 and four-digit strings (`strftime('%Y', d) = '2021'`)."""
    found = {v for v in values if isinstance(v, int) and not isinstance(v, bool) and 1900 <= v <= 2100}
    found |= {int(v) for v in values if isinstance(v, str) and re.fullmatch(r"(19|20)\d\d|2100", v)}
    return sorted(found)


def value_key(value: Any) -> tuple[str, Any]:
    """A hashable identity that keeps 1, 1.0, True and '1' apart."""
    return type(value).__name__, value


def _distinct(values: list[Any]) -> list[Any]:
    seen, out = set(), []
    for value in values:
        key = value_key(value)
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


def random_database(
    context: ContextDB, tables: list[TableSpec], pools: ValuePools, rng: random.Random
) -> SandboxDB:
    """One candidate database: the context's schema (tables, views, triggers) with generated rows."""
    db = context.fresh()
    try:
        subpools: dict[str, list[Any]] = {}
        focus_bias = rng.choice(_FOCUS_BIAS)
        for table in tables:
            count = rng.choice(_ROW_COUNTS)
            nulls = {c.name: rng.choice((0.0, 0.0, 0.25)) for c in table.columns if not c.not_null}
            rows = []
            for _ in range(count):
                row = []
                for column in table.columns:
                    key = pools.key(column.name.lower())
                    if column.name in nulls and rng.random() < nulls[column.name]:
                        row.append(None)
                        continue
                    if column.key:
                        row.append(rng.choice(pools.pools.get(key) or [None]))
                        continue
                    if key not in subpools:
                        subpools[key] = pools.subpool(key, rng, focus_bias)
                    pool = subpools[key]
                    row.append(rng.choice(pool))
                rows.append(tuple(row))
            if rows and rng.random() < 0.5:
                rows += rng.choices(rows, k=rng.choice((1, 2)))  # duplicate rows, so DISTINCT matters
            fill_table(db, table, rows)
    except BaseException:
        db.close()
        raise
    return db


def fill_table(db: SandboxDB, table: TableSpec, rows: list[tuple]) -> None:
    """Replace `table`'s rows with `rows`, skipping those a constraint rejects."""
    name = quote_identifier(table.name)
    db.conn.execute(f"DELETE FROM {name}")
    columns = ", ".join(quote_identifier(c.name) for c in table.columns)
    marks = ", ".join("?" for _ in table.columns)
    # on an error (e.g. a generated column) the table keeps what it took before it
    with contextlib.suppress(sqlite3.Error, OverflowError):
        db.conn.executemany(f"INSERT OR IGNORE INTO {name} ({columns}) VALUES ({marks})", rows)


def nontrivial(result: QueryResult, before: dict | None) -> bool:
    """A result that a constant cannot guess: some row with a value other than NULL, 0 or ''; for DML, a change."""
    if result.rows is not None:
        return any(v not in (None, 0, "") for row in result.rows for v in row)
    return result.tables != before


def trivial_reason(results: list[QueryResult], *, all_trivial: bool = True) -> str:
    """Why a constant could match the gold, given its `results` on every database, in words: they are all trivial
    (`nontrivial` is False for each), or else all the same."""
    if not all_trivial and all(r.rows is None for r in results):
        return "the same tables afterwards on every database (a fixed statement matches)"
    if not all_trivial:
        return "the same answer on every database (a query that returns it as literals matches)"
    if all(r.rows is None for r in results):
        return "DML that changes nothing on any database"
    if all(r.rows == [] for r in results):
        return "empty result on every database"
    if all(r.rows for r in results):
        return "only NULL, 0 or '' on every database"
    return "empty, or only NULL, 0 or '', on every database"


@dataclass
class _Distiller:
    """One row's suite being built: what is still needed, and how a candidate database is judged."""

    context: ContextDB
    gold_sql: str
    gold: QueryResult
    ordered: bool
    read_only: bool
    suite: Suite
    alive: list[str]
    need_nontrivial: bool
    """No database yet gives the gold an answer a constant cannot guess (`nontrivial`)."""
    need_varied: bool
    """The gold's answer is the same on every database so far (a query returning it as literals would pass)."""
    timed_out: bool = False
    """The gold ran out of time on a candidate (then no more witnesses, which can be large, are tried)."""

    def run(self, db: SandboxDB, sql: str) -> QueryResult:
        return db.run_query(sql) if self.read_only else run_on_copy(db, sql)

    def consider(self, db: SandboxDB, *, for_needs_only: bool = False) -> bool:
        """Keep `db` (True) when it rejects a neighbour still alive or meets a need; else close it."""
        from job.evaluation.scoring import results_match

        self.suite.candidates += 1
        before = db.snapshot() if not self.read_only else None
        gold_k = self.run(db, self.gold_sql)
        self.timed_out = self.timed_out or (gold_k.error or "").startswith("timeout")
        found = gold_k.ok and nontrivial(gold_k, before)
        varied = gold_k.ok and not results_match(self.gold, gold_k, ordered=self.ordered)
        meets = (self.need_nontrivial and found) or (self.need_varied and varied)
        if not gold_k.ok or (for_needs_only and not meets):
            db.close()
            return False
        killed = [text for text in self.alive
                  if not ((result := self.run(db, text)).ok and results_match(gold_k, result, ordered=self.ordered))]
        if not (killed or meets):
            db.close()
            return False
        self.suite.databases.append(db)
        self.suite.gold.append(gold_k)
        self.alive = [text for text in self.alive if text not in killed]
        self.need_nontrivial = self.need_nontrivial and not found
        self.need_varied = self.need_varied and not varied
        return True

    @property
    def needs(self) -> bool:
        return self.need_nontrivial or self.need_varied


def distill(
    context: ContextDB,
    gold_sql: str,
    gold: QueryResult,
    *,
    ordered: bool,
    size: int,
    budget: int,
    seed: int,
    max_neighbours: int = 40,
    witness_tries: int = WITNESS_TRIES,
) -> Suite:
    """The row's suite: candidate databases that reject a still-accepted neighbour of `gold_sql` (see module doc).

    The suite also gets a database where the gold's answer is non-trivial (rows, and a value other than NULL, 0
    or ''; for DML, a change) when the row's own database gives a trivial one, and one where its answer differs
    from the own database's: a witness database built to satisfy the gold (`job.evaluation.witnesses`, at most
    `witness_tries` attempts), else a random one. When no database can be found for either, `Suite.trivial`
    says why a constant (or a query returning the answer as literals) could pass.
    """
    from job.evaluation.mutations import neighbours as make_neighbours
    from job.evaluation.scoring import results_match

    read_only = _is_query(gold_sql)
    before = context.template.snapshot() if not read_only else None
    suite = Suite()
    work = _Distiller(context, gold_sql, gold, ordered, read_only, suite, [],
                      need_nontrivial=not nontrivial(gold, before), need_varied=True)
    if size > 0:
        with context.fresh() as own:
            for _, text in make_neighbours(gold_sql, limit=max_neighbours, seed=seed):
                result = own.run_query(text) if read_only else run_on_copy(context.template, text)
                if not result.ok:
                    continue
                suite.n_neighbours += 1
                if results_match(gold, result, ordered=ordered):
                    work.alive.append(text)
            suite.rejected_single_db = suite.n_neighbours - len(work.alive)
            constants = [text for text in (schema_constants(context.template) if read_only else [])
                         if text not in work.alive and results_match(gold, own.run_query(text), ordered=ordered)]
            work.alive += constants
        tables = parse_schema(context.template)
        if tables:
            _fill_suite(work, tables, size=size, budget=budget, seed=seed, witness_tries=witness_tries)
        suite.survivors = [text for text in work.alive if text not in constants]
        suite.rejected_suite = suite.n_neighbours - len(suite.survivors)
    if work.needs:
        suite.trivial = trivial_reason([gold, *suite.gold], all_trivial=work.need_nontrivial)
    return suite


def schema_constants(db: SandboxDB) -> list[str]:
    """Queries that read the schema but not the question: every row, and the row count, of each table and view.

    The suite rejects them like the gold's neighbours (not counted in its power): a filter hidden in a view, or a
    gold that counts a whole table on every database but its own, would otherwise let them pass."""
    names = db.conn.execute(
        "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    return [f"SELECT {what} FROM {quote_identifier(name)}" for (name,) in names for what in ("*", "COUNT(*)")]


def _fill_suite(work: _Distiller, tables: list[TableSpec], *, size: int, budget: int, seed: int,
                witness_tries: int) -> None:
    """Witnesses for the needs first when the own database's answer is trivial; then `budget` candidates, random
    and witness variants in turn (stopping one short of `size` while a need is open and no witness was tried for
    it); then witnesses for a need still open."""
    from job.evaluation.witnesses import read_plan, witness_database

    context, limits = work.context, work.context.template.limits
    rng, witness_rng = random.Random(seed), random.Random(seed ^ 0x5EED)
    pools = ValuePools(tables, context.template.snapshot(), work.gold_sql, limits.fixed_now, limits)
    plan = read_plan(work.gold_sql, context.template, tables, pools)
    tried_for_needs = False

    def witnesses_for_needs() -> None:
        for attempt in range(witness_tries):
            if not work.needs or len(work.suite.databases) >= size or work.timed_out:
                return
            work.consider(witness_database(context, tables, pools, plan, witness_rng, plain=attempt == 0),
                          for_needs_only=True)

    if work.need_nontrivial:
        witnesses_for_needs()
        tried_for_needs = True
    end = work.suite.candidates + budget
    while work.suite.candidates < end and (work.alive or work.needs) \
            and len(work.suite.databases) < size - (1 if work.needs and not tried_for_needs else 0):
        if (end - work.suite.candidates) % 2 and not work.timed_out:
            work.consider(witness_database(context, tables, pools, plan, witness_rng, plain=False))
        else:
            work.consider(random_database(context, tables, pools, rng))
    if work.needs and not tried_for_needs:
        witnesses_for_needs()


def run_on_copy(template: SandboxDB, sql: str) -> QueryResult:
    """`sql` on a fresh hardened copy of `template` (a suite database or a context's), which stays unchanged."""
    with SandboxDB(template.limits, source=template.conn) as db:
        return db.run_query(sql)


def _is_query(sql: str) -> bool:
    """Whether `sql` is one read-only SELECT/UNION/WITH statement (so one connection can serve many runs)."""
    import sqlglot
    from sqlglot import exp

    try:
        with quiet_sqlglot():
            parsed = sqlglot.parse(sql, read="sqlite")
    except (sqlglot.errors.SqlglotError, ValueError):
        return False
    statements = [p for p in parsed if p is not None]
    return len(statements) == 1 and isinstance(statements[0], exp.Query)
