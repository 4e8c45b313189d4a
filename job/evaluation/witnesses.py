"""Witness databases: rows built to satisfy a gold query, so that its answer there is one no constant guesses.

A random database rarely satisfies a gold with several filters, a join on differently named columns, a
`HAVING COUNT(*) > 10` or a date window: the gold's answer there is empty, NULL or 0, which a constant predictor
matches. `read_plan` reads what the gold asks of a database from its sqlglot AST (and from the views it may read):

- filters: every WHERE, HAVING and JOIN ... ON condition, split at AND. A conjunct on one column (`x > 5`,
  `name LIKE '%a%'`, `d >= DATE('2024-01-15', '-1 year')`, `x IN (1, 2)`, `a = 'A' OR a = 'B'`, `SUM(x) > 9`
  read as `x > 9`) is evaluated in the sandbox on that column's candidate values (the `ValuePools` pool: the
  context's values, the gold's literals and their neighbours, dates around "now"; plus a date in every month of
  the years the gold names). A column keeps the candidates that pass every conjunct of one SELECT (the union
  over SELECTs). Conditions under NOT or after EXCEPT are left out: there the gold wants them false.
- joins: columns equated across tables (`a.x = b.y`, `x IN (SELECT y ...)`) share one small list of values.
- group sizes: `COUNT(...) > N` (>=, =, BETWEEN) asks for N+1 (N) rows in each table its SELECT reads; GROUP BY
  columns get few distinct values, so groups fill up.

`witness_database` fills every table from that plan, a few rows each: plainly (one passing value per filtered
column) or with seeded variety. Whether the gold's answer on it is non-trivial is for the caller to check, by
running the gold.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from job.evaluation.sandbox import SandboxDB, quiet_sqlglot
from job.evaluation.suites import (
    TableSpec,
    ValuePools,
    coerce,
    fill_table,
    gold_values,
    neighbour_values,
    value_key,
    years_of,
)

Key = tuple[str, str]
"""(table, column), lower-cased."""
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_ROW_COUNTS = (1, 2, 3, 4, 6, 8)
_MAX_ROWS = 1_000
"""Rows per table at most, whatever a COUNT comparison asks for."""
_SPREADS = (1, 1, 2, 3, 6)
"""Distinct values per filtered, joined or grouped column, per database after the first."""
_MISSES = (0.0, 0.0, 0.2, 0.5)
"""How often a filtered column draws from its whole pool instead (near misses), per database after the first."""
_AGGREGATES_AS_VALUES = ("Sum", "Avg", "Min", "Max")


@dataclass
class Plan:
    """What the gold asks of a database (see the module docstring)."""

    passing: dict[Key, list[Any]] = field(default_factory=dict)
    """Candidate values that pass the gold's filters on the column, best first."""
    groups: list[list[Key]] = field(default_factory=list)
    """Columns equated by joins: each group shares one list of values."""
    grouped: set[Key] = field(default_factory=set)
    """GROUP BY columns."""
    min_rows: dict[str, int] = field(default_factory=dict)
    """Table -> rows its COUNT(...) comparisons ask for."""


def read_plan(gold_sql: str, template: SandboxDB, tables: list[TableSpec], pools: ValuePools) -> Plan:
    """The gold's (and its views') filters, joins, GROUP BY columns and group sizes, with passing values."""
    import sqlglot

    views = template.conn.execute("SELECT sql FROM sqlite_schema WHERE type = 'view' AND sql IS NOT NULL").fetchall()
    trees = []
    for text in [gold_sql, *(sql for (sql,) in views)]:
        try:
            with quiet_sqlglot():
                trees += [tree for tree in sqlglot.parse(text, read="sqlite") if tree is not None]
        except (sqlglot.errors.SqlglotError, ValueError):
            continue
    reader = _Reader(tables, trees, pools)
    for tree in trees:
        reader.read(tree)
    for (sql,) in views:  # the gold's own literals are in the pools already
        for name, values in gold_values(sql, template.limits)[0].items():
            reader.view_values.setdefault(name, []).extend(values)
    return reader.plan(template)


class _Reader:
    def __init__(self, tables: list[TableSpec], trees: list[Any], pools: ValuePools) -> None:
        from sqlglot import exp

        self.pools = pools
        self.kinds = {(t.name.lower(), c.name.lower()): c.kind for t in tables for c in t.columns}
        self.columns_of = {t.name.lower(): {c.name.lower() for c in t.columns} for t in tables}
        self.aliases: dict[str, set[str]] = {}
        for tree in trees:
            for node in tree.find_all(exp.Table):
                name = node.name.lower()
                if name in self.columns_of:
                    self.aliases.setdefault(node.alias_or_name.lower(), set()).add(name)
                    self.aliases.setdefault(name, set()).add(name)
        self.referenced = {name for names in self.aliases.values() for name in names}
        self.conditions: dict[tuple[int, Key], list[str]] = {}
        self.scopes: dict[int, int] = {}
        self.parent: dict[Key, Key] = {}
        self.grouped: set[Key] = set()
        self.min_rows: dict[str, int] = {}
        self.view_values: dict[str, list[Any]] = {}
        literals = [str(node.this) for tree in trees for node in tree.find_all(exp.Literal)]
        self.years = years_of([*literals, *(text[:4] for text in literals if _ISO_DATE.match(text))])

    def read(self, tree: Any) -> None:
        from sqlglot import exp

        for node in tree.find_all(exp.Where, exp.Having, exp.Join, exp.Group):
            scope = node.find_ancestor(exp.Select, exp.Update, exp.Delete)
            if scope is None or _negated(scope):
                continue
            if isinstance(node, exp.Group):
                self.grouped |= {k for column in node.find_all(exp.Column) for k in self.resolve(column)}
                continue
            condition = node.args.get("on") if isinstance(node, exp.Join) else node.this
            for conjunct in _conjuncts(condition):
                self.read_conjunct(conjunct, scope)

    def read_conjunct(self, conjunct: Any, scope: Any) -> None:
        from sqlglot import exp

        if isinstance(conjunct, exp.EQ) and all(isinstance(side, exp.Column) for side in conjunct.unnest_operands()):
            self.join(*sorted(k for side in conjunct.unnest_operands() for k in self.resolve(side)))
            return
        query = conjunct.args.get("query") if isinstance(conjunct, exp.In) else None
        if query is not None:
            inner = query.this if isinstance(query, exp.Subquery) else query
            projections = inner.expressions if isinstance(inner, exp.Select) else []
            if isinstance(conjunct.this, exp.Column) and len(projections) == 1 \
                    and isinstance(projections[0].unalias(), exp.Column):
                self.join(*sorted(self.resolve(conjunct.this) | self.resolve(projections[0].unalias())))
            return
        if conjunct.find(exp.Count):
            self.read_count(conjunct, scope)
            return
        columns = list(conjunct.find_all(exp.Column))
        if not columns or conjunct.find(exp.Select, exp.Window) or len({c.name.lower() for c in columns}) != 1:
            return  # a multi-column condition: left to variety (and the gold's check)
        keys = {k for column in columns for k in self.resolve(column)}

        def as_value(node: Any) -> Any:
            if isinstance(node, exp.Column):
                return exp.column("v")
            if type(node).__name__ in _AGGREGATES_AS_VALUES:
                return node.this
            return node

        text = conjunct.transform(as_value).sql(dialect="sqlite")
        scope_number = self.scopes.setdefault(id(scope), len(self.scopes))  # in reading order: deterministic
        for key in keys:
            self.conditions.setdefault((scope_number, key), []).append(text)

    def read_count(self, conjunct: Any, scope: Any) -> None:
        """`COUNT(...) > N` and the like: each table the scope reads needs that many rows."""
        from sqlglot import exp

        wanted = None
        if isinstance(conjunct, exp.Between) and isinstance(conjunct.this, exp.Count):
            wanted = _number(conjunct.args.get("low"))
        elif isinstance(conjunct, (exp.GT, exp.GTE, exp.EQ, exp.LT, exp.LTE)):
            left, right = conjunct.this, conjunct.expression
            flipped = {exp.GT: exp.LT, exp.LT: exp.GT, exp.GTE: exp.LTE, exp.LTE: exp.GTE, exp.EQ: exp.EQ}
            kind = type(conjunct)
            if isinstance(right, exp.Count):
                left, right, kind = right, left, flipped[kind]
            number = _number(right) if isinstance(left, exp.Count) else None
            if number is not None:
                wanted = {exp.GT: math.floor(number) + 1, exp.GTE: math.ceil(number), exp.EQ: number}.get(kind)
        if wanted is None or wanted < 1:
            return
        for alias in _scope_tables(scope):
            for name in self.aliases.get(alias, set()):
                self.min_rows[name] = max(self.min_rows.get(name, 0), min(int(wanted), _MAX_ROWS))

    def resolve(self, column: Any) -> set[Key]:
        """The table columns a column reference may mean: by its qualifier's table, else by name."""
        name = column.name.lower()
        owners = {table for table, names in self.columns_of.items() if name in names}
        qualifier = column.table.lower() if column.table else ""
        hit = self.aliases.get(qualifier, set()) & owners if qualifier else set()
        return {(table, name) for table in (hit or (owners & self.referenced) or owners)}

    def join(self, *keys: Key) -> None:
        for key in keys[1:]:
            root_a, root_b = self.root(keys[0]), self.root(key)
            if root_a != root_b:
                self.parent[root_b] = root_a

    def root(self, key: Key) -> Key:
        while self.parent.get(key, key) != key:
            key = self.parent[key]
        return key

    def candidates(self, key: Key) -> list[Any]:
        pool = self.pools.pools.get(self.pools.key(key[1])) or []
        kind = self.kinds.get(key, "text")
        extra: list[Any] = []
        if kind in ("date", "datetime"):
            extra = [f"{year}-{month:02d}-15" for year in self.years for month in range(1, 13)]
            if kind == "datetime":
                extra = [f"{d} 12:00:00" for d in extra]
        tied = [v for v in (coerce(v, kind) for v in self.view_values.get(key[1], [])) if v is not None]
        extra += tied + [n for v in tied for n in neighbour_values(v, kind)]
        return _distinct([*pool, *extra, None])

    def plan(self, template: SandboxDB) -> Plan:
        plan = Plan(grouped=self.grouped, min_rows=self.min_rows)
        with SandboxDB(template.limits) as scratch:
            for (_, key), texts in sorted(self.conditions.items(), key=lambda item: (item[0][1], item[0][0])):
                candidates = self.candidates(key)
                found = _passing(scratch, texts, candidates)
                if found:
                    plan.passing[key] = _distinct([*plan.passing.get(key, []), *found])
        members: dict[Key, set[Key]] = {}
        for key in self.parent:
            members.setdefault(self.root(key), {self.root(key)}).add(key)
        for group in sorted(sorted(keys) for keys in members.values()):  # not by root: set order is salted
            plan.groups.append(group)
            constrained = [plan.passing[k] for k in group if k in plan.passing]
            if constrained:
                common = [v for v in constrained[0] if all(value_key(v) in {value_key(w) for w in s}
                                                           for s in constrained[1:])]
                shared = common or _distinct([v for values in constrained for v in values])
            else:
                shared = _distinct([v for k in group for v in self.candidates(k) if v is not None])
            for key in group:
                plan.passing[key] = shared
        return plan


def witness_database(
    context: Any, tables: list[TableSpec], pools: ValuePools, plan: Plan, rng: random.Random, *, plain: bool
) -> SandboxDB:
    """One database filled from `plan` (see the module docstring).

    `plain`: one passing value per filtered column, two rows per table (or what COUNT asks for). Otherwise the
    number of distinct values, the rows per table, near misses (a filtered column drawing from its whole pool now
    and then) and duplicate rows vary, so that the database may also tell the gold from its neighbours."""
    spread = 1 if plain else rng.choice(_SPREADS)
    miss = 0.0 if plain else rng.choice(_MISSES)
    balanced = plain or rng.random() < 0.5
    chosen: dict[Key, list[Any]] = {}
    for group in plan.groups:
        values = _sample(plan.passing[group[0]], spread, rng, plain)
        chosen.update({key: values for key in group})
    for key, values in sorted(plan.passing.items()):
        if key not in chosen:
            chosen[key] = _sample(values, spread, rng, plain)
    for key in sorted(plan.grouped):
        if key not in chosen:
            chosen[key] = _sample(_usable(pools, key[1]), spread, rng, plain)
    db = context.fresh()
    try:
        for table in tables:
            name = table.name.lower()
            count = _row_count(plan.min_rows.get(name, 0), spread, rng, plain)
            used: dict[str, set] = {c.name: set() for c in table.columns if c.key}
            rows = []
            for index in range(count):
                row = []
                for column in table.columns:
                    options = chosen.get((name, column.name.lower()))
                    pool = _usable(pools, column.name.lower())
                    if options and miss and rng.random() < miss:
                        options = None
                    if column.key:
                        value = _unused(options or [], pool, used[column.name], column.kind, index)
                    elif options:
                        value = options[index % len(options)] if balanced else rng.choice(options)
                    else:
                        value = rng.choice(pool)
                    row.append(value)
                rows.append(tuple(row))
            if rows and not plain and rng.random() < 0.3:
                rows += rng.choices(rows, k=rng.choice((1, 2)))  # duplicate rows, so DISTINCT matters
            fill_table(db, table, rows)
    except BaseException:
        db.close()
        raise
    return db


def _row_count(target: int, spread: int, rng: random.Random, plain: bool) -> int:
    """Rows for one table: what its COUNT comparisons ask for (per group: times `spread`; or one short, for the
    neighbours that move the bound), else a few."""
    if plain:
        return max(target, 2)
    count = rng.choice(_ROW_COUNTS)
    if target:
        count = rng.choice((target - 1, target, target * spread, target * spread))
    return max(1, min(count, _MAX_ROWS))


def _passing(scratch: SandboxDB, conditions: list[str], candidates: list[Any]) -> list[Any]:
    """The candidates for which every condition (on the column `v`) is true, in order; [] if they do not run."""
    literals = [(i, _sql_literal(v)) for i, v in enumerate(candidates)]
    literals = [(i, text) for i, text in literals if text is not None]
    if not literals:
        return []
    values = ", ".join(f"({i}, {text})" for i, text in literals)
    where = " AND ".join(f"({c})" for c in conditions)
    result = scratch.run_query(f"WITH c(i, v) AS (VALUES {values}) SELECT i FROM c WHERE {where}")
    if not result.ok or not result.rows:
        return []
    return [candidates[i] for (i,) in sorted(result.rows)]


def _sql_literal(value: Any) -> str | None:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return None


def _conjuncts(condition: Any) -> list[Any]:
    from sqlglot import exp

    if condition is None:
        return []
    if isinstance(condition, exp.Paren):
        return _conjuncts(condition.this)
    if isinstance(condition, exp.And):
        return _conjuncts(condition.this) + _conjuncts(condition.expression)
    return [condition]


def _negated(scope: Any) -> bool:
    """Whether the gold wants `scope`'s conditions false: it sits under a NOT, or after an EXCEPT."""
    from sqlglot import exp

    node = scope
    while node.parent is not None:
        parent = node.parent
        if isinstance(parent, exp.Not) or (isinstance(parent, exp.Except) and node is parent.expression):
            return True
        node = parent
    return False


def _scope_tables(scope: Any) -> list[str]:
    """Names (or aliases) of the tables a SELECT reads directly (FROM and JOINs), or an UPDATE/DELETE changes."""
    from sqlglot import exp

    if isinstance(scope, (exp.Update, exp.Delete)):
        sources = [scope.this]
    else:
        sources = [(scope.args.get("from_") or exp.From()).this, *(j.this for j in scope.args.get("joins") or [])]
    return [s.alias_or_name.lower() for s in sources if isinstance(s, exp.Table)]


def _number(node: Any) -> float | None:
    from sqlglot import exp

    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return float(node.this)
        except ValueError:
            return None
    return None


def _usable(pools: ValuePools, column: str) -> list[Any]:
    values = [v for v in pools.pools.get(pools.key(column)) or [] if v is not None]
    return values or [0]


def _sample(values: list[Any], spread: int, rng: random.Random, plain: bool) -> list[Any]:
    if plain:
        return values[:spread]
    return rng.sample(values, min(spread, len(values)))


def _unused(options: list[Any], pool: list[Any], used: set, kind: str, index: int) -> Any:
    """A value for a PRIMARY KEY/UNIQUE column not used yet in the table: a passing one first, then the pool's."""
    for value in [*options, *pool]:
        if value_key(value) not in used:
            used.add(value_key(value))
            return value
    if kind in ("int", "bool"):
        value: Any = 1_000 + index
    elif kind == "real":
        value = 1_000.5 + index
    elif kind in ("date", "datetime"):
        value = (dt.date(2000, 1, 1) + dt.timedelta(days=index)).isoformat()
    else:
        value = f"k{index}"
    used.add(value_key(value))
    return value


def _distinct(values: list[Any]) -> list[Any]:
    seen, out = set(), []
    for value in values:
        if value_key(value) not in seen:
            seen.add(value_key(value))
            out.append(value)
    return out
