"""Wrong neighbours of a gold query: small edits of its sqlglot AST that change what it means.

Used to distill database suites (Zhong, Yu & Klein 2020): a database earns its place in a row's suite when it
tells the gold apart from some neighbour. Each neighbour comes from one edit of one node:

- aggregate: MAX <-> MIN, SUM <-> AVG, COUNT(x) <-> COUNT(DISTINCT x)
- literal: a number +1 / -1, a date one day later, another string with one character added
- comparison: > <-> >=, < <-> <=, = <-> !=, > <-> <
- boolean: AND <-> OR, NOT dropped, the WHERE condition negated
- ordering: ASC <-> DESC, ORDER BY dropped (when a LIMIT makes it matter or the gold's row order counts)
- dropped clause: WHERE, one side of an AND, HAVING, GROUP BY, LIMIT, DISTINCT
- added clause: DISTINCT, LIMIT 1, a contradiction (`AND 1 = 0`, which only an empty/NULL/0 answer survives)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

from job.evaluation.sandbox import quiet_sqlglot

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
Edit = Callable[[Any], "Any | None"]


def _swap(mapping: dict[type, type]) -> Edit:
    def edit(node: Any) -> Any | None:
        target = mapping.get(type(node))
        if target is None:
            return None
        if hasattr(node, "expression") and "expression" in target.arg_types and "this" in target.arg_types \
                and node.args.get("expression") is not None:
            return target(this=node.this.copy(), expression=node.expression.copy())
        return target(this=node.this.copy())

    return edit


def _edits() -> list[tuple[str, Edit]]:
    from sqlglot import exp

    def count_distinct(node: Any) -> Any | None:
        if not isinstance(node, exp.Count) or node.this is None or isinstance(node.this, exp.Star):
            return None
        if isinstance(node.this, exp.Distinct):
            inner = node.this.expressions
            return exp.Count(this=inner[0].copy()) if len(inner) == 1 else None
        return exp.Count(this=exp.Distinct(expressions=[node.this.copy()]))

    def number(delta: int) -> Edit:
        def edit(node: Any) -> Any | None:
            if not isinstance(node, exp.Literal) or node.is_string or node.find_ancestor(exp.DataType):
                return None
            try:
                value = float(node.this)
            except ValueError:
                return None
            shifted = value + delta
            return exp.Literal.number(int(shifted) if shifted.is_integer() and "." not in node.this else shifted)

        return edit

    def string(node: Any) -> Any | None:
        if not isinstance(node, exp.Literal) or not node.is_string or isinstance(node.parent, (exp.Interval, exp.Func)):
            return None  # a function's argument (a date format, a modifier) is not a value to get wrong
        if _ISO_DATE.match(node.this):  # a date one day later, not a string no date equals
            try:
                later = dt.date.fromisoformat(node.this[:10]) + dt.timedelta(days=1)
            except ValueError:
                return None
            return exp.Literal.string(later.isoformat() + node.this[10:])
        return exp.Literal.string(node.this + "x")

    def drop_not(node: Any) -> Any | None:
        return node.this.copy() if isinstance(node, exp.Not) else None

    def negate_where(node: Any) -> Any | None:
        return exp.Where(this=exp.Not(this=exp.Paren(this=node.this.copy()))) if isinstance(node, exp.Where) else None

    def and_side(side: str) -> Edit:
        return lambda node: node.args[side].copy() if isinstance(node, exp.And) else None

    def flip_order(node: Any) -> Any | None:
        if not isinstance(node, exp.Ordered):
            return None
        return exp.Ordered(this=node.this.copy(), desc=not node.args.get("desc"), nulls_first=None)

    def drop(kind: type) -> Edit:
        return lambda node: _without(node, kind)

    def contradiction(node: Any) -> Any | None:
        if not isinstance(node, exp.Select) or isinstance(node.parent, (exp.Subquery, exp.In)):
            return None
        return node.copy().where(exp.EQ(this=exp.Literal.number(1), expression=exp.Literal.number(0)))

    def add_distinct(node: Any) -> Any | None:
        if not isinstance(node, exp.Select) or node.args.get("distinct") or node.args.get("group") \
                or _one_row(node) or node.find(exp.Window):
            return None  # DISTINCT over GROUP BY keys, one row, or numbered rows changes nothing
        return node.copy().distinct()

    def add_limit(node: Any) -> Any | None:
        if not isinstance(node, exp.Select) or node.args.get("limit") or isinstance(node.parent, exp.Subquery) \
                or _one_row(node):
            return None
        return node.copy().limit(1)

    return [
        ("aggregate", _swap({exp.Max: exp.Min, exp.Min: exp.Max, exp.Sum: exp.Avg, exp.Avg: exp.Sum})),
        ("aggregate", count_distinct),
        ("literal", number(1)),
        ("literal", number(-1)),
        ("literal", string),
        ("comparison", _swap({exp.GT: exp.GTE, exp.GTE: exp.GT, exp.LT: exp.LTE, exp.LTE: exp.LT,
                              exp.EQ: exp.NEQ, exp.NEQ: exp.EQ})),
        ("comparison", _swap({exp.GT: exp.LT, exp.LT: exp.GT})),
        ("boolean", _swap({exp.And: exp.Or, exp.Or: exp.And})),
        ("boolean", drop_not),
        ("boolean", negate_where),
        ("ordering", flip_order),
        ("dropped clause", drop(exp.Order)),
        ("dropped clause", drop(exp.Where)),
        ("dropped clause", and_side("this")),
        ("dropped clause", and_side("expression")),
        ("dropped clause", drop(exp.Having)),
        ("dropped clause", drop(exp.Group)),
        ("dropped clause", drop(exp.Limit)),
        ("dropped clause", drop(exp.Distinct)),
        ("added clause", add_distinct),
        ("added clause", add_limit),
        ("added clause", contradiction),
    ]


def _one_row(select: Any) -> bool:
    """An aggregate SELECT without GROUP BY always returns exactly one row."""
    from sqlglot import exp

    limit = select.args.get("limit")
    if limit is not None and limit.expression is not None and limit.expression.sql() == "1":
        return True
    if select.args.get("group") is not None:
        return False
    return any(
        any(isinstance(n, exp.AggFunc) and not isinstance(n.parent, exp.Window) and n.find_ancestor(exp.Select)
            is select for n in projection.walk())
        for projection in select.expressions
    )


def _without(node: Any, kind: type) -> Any | None:
    """A copy of the statement `node` without its `kind` clause (node is the clause's parent)."""
    key = {"Order": "order", "Where": "where", "Having": "having", "Group": "group", "Limit": "limit",
           "Distinct": "distinct"}[kind.__name__]
    if node.args.get(key) is None or not isinstance(node.args.get(key), kind):
        return None
    copy = node.copy()
    copy.set(key, None)
    return copy


def neighbours(sql: str, *, limit: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, SQLite text) of distinct one-edit neighbours of `sql` (SQLite dialect), at most `limit`.

    Deterministic: when there are more than `limit`, a sample drawn with `seed` is kept, every kind first.
    """
    import sqlglot

    try:
        with quiet_sqlglot():
            tree = sqlglot.parse_one(sql, read="sqlite")
    except (sqlglot.errors.SqlglotError, ValueError):
        return []
    if tree is None or isinstance(tree, (sqlglot.exp.Command, sqlglot.exp.Create, sqlglot.exp.Drop)):
        return []  # DDL: its neighbours (a wider VARCHAR, ...) mostly mean the same
    with quiet_sqlglot():
        original = tree.sql(dialect="sqlite")
        found: dict[str, str] = {}
        for kind, text in _all_edits(tree):
            if text != original and text not in found:
                found[text] = kind
    items = [(kind, text) for text, kind in found.items()]
    if len(items) <= limit:
        return items
    rng = random.Random(seed)
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        by_kind.setdefault(item[0], []).append(item)
    chosen = [rng.choice(group) for group in by_kind.values()]
    rest = [item for item in items if item not in chosen]
    return chosen + rng.sample(rest, max(0, limit - len(chosen)))


def _all_edits(tree: Any) -> Iterator[tuple[str, str]]:
    """Each edit applied in place, printed, and undone (no copy of the whole tree per neighbour)."""
    positions = list(tree.walk())
    for kind, edit in _edits():
        for node in positions:
            try:
                replacement = edit(node)
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
            if replacement is None:
                continue
            if node is tree:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    yield kind, replacement.sql(dialect="sqlite")
                continue
            node.replace(replacement)
            try:
                text = replacement.root().sql(dialect="sqlite")
            except (ValueError, TypeError, AttributeError):
                text = None
            finally:
                replacement.replace(node)
            if text is not None:
                yield kind, text
