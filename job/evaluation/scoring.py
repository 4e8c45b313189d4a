"""Score predicted SQL against gold SQL by executing both in the SQLite sandbox.

Metric definitions (every rate is a fraction in [0, 1], or None when its denominator is 0):

- `n_rows`: rows scored; a row without a prediction counts as an empty prediction.
- `n_gold_failed`: rows whose context cannot be fully built or whose gold SQL fails on it in SQLite, even after
  the rewrites of `job.evaluation.compat` (other dialects, MySQL functions, a fixed "now", schema prefixes), or
  whose gold is not deterministic (RANDOM()). They are listed in the per-row records with `gold_error` and left
  out of both execution accuracies only.
- `n_scored` = `n_rows - n_gold_failed`; `n_gold_transpiled`, `n_context_transpiled`, `n_pred_transpiled` count the
  rows whose gold, context or prediction only ran after a rewrite (flagged per row).
- `execution_accuracy_single_db` (over `n_scored`): gold and prediction, each run on its own fresh database built
  from the context, give the same result. Results are multisets of rows compared up to a column permutation
  (column names ignored, Spider test-suite style); row order counts only when the gold's last statement has a
  top-level ORDER BY; floats agree to 10 significant digits and 3.0 equals 3. When the gold's last statement
  returns no result set (INSERT/UPDATE/DELETE/DDL), the contents of every table and view afterwards are
  compared instead (column names and order count there, row order does not).
- `execution_accuracy` (over `n_scored`): test-suite accuracy, the single-DB match and the same match on every
  database of the row's distilled suite (`job.evaluation.suites`; none when `test_suite_size` is 0).
- `n_trivial` (of `n_scored`): rows where a prediction that ignores the question could still match: on the row's
  own database and every suite database, the gold's answer is empty, only NULL/0/'' or (DML) changes nothing, or
  it is the same answer everywhere (so a query returning it as literals matches). The distiller builds databases
  that satisfy the gold (`job.evaluation.witnesses`) to avoid this; a row is trivial only when none can be had
  (contradictory filters, a key that rules out the grouping the gold asks for, a gold that reads no data; with
  `test_suite_size` 0 every row is). Trivial rows are scored and counted in `n_scored` like any other; the per-row
  records flag them (`trivial`, `trivial_reason`) and the report lists them apart.
- `ci95`: a 95% bootstrap interval for every rate; `test_suite`: the suite's power on the gold's own neighbours.
- `exact_match` (over `n_rows`): equal after lower-casing, collapsing whitespace and dropping trailing `;`.
- `normalized_match` (over `n_rows`): equal after sqlglot parses both (SQLite dialect, then its default
  dialect), qualifies columns against the context's schema where it can, normalizes and simplifies boolean
  logic (sorting conjuncts) and identifiers, and prints them back; falls back to `exact_match` when either
  side does not parse. Table aliases are not unified (execution match covers those).
- `valid_sql_rate` (over `n_rows`): the prediction is non-empty and SQLite runs it on the context without
  error (for rows whose context failed to build, on what could be built).
- `empty_rate` (over `n_rows`): nothing SQL-like in the prediction (see `job.sql_extract.extract_sql`).
- `runaway_rate` (over predictions that carry `stopped`): share that did not stop by itself (hit the token
  limit); None when no prediction carries `stopped`.
- `n_scoring_errors`: rows on which the scorer itself failed (e.g. sqlglot's RecursionError on deeply nested SQL),
  each with its `scoring_error`: in the context, gold or suite the row counts in `n_gold_failed`; in a
  prediction, that prediction is wrong. A prediction longer than the sandbox's `max_sql_chars` is refused before
  any parsing (`pred_error`); SQL longer than `max_parse_chars` runs as written, without rewrites or
  normalization.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from job.errors import JobError, PreemptedError
from job.evaluation.compat import qualify_equijoined, sqlite_rewrites
from job.evaluation.confidence import bootstrap_interval
from job.evaluation.sandbox import ContextDB, Limits, QueryResult, SandboxDB, build_context, quiet_sqlglot
from job.evaluation.sql_extract import extract_sql
from job.evaluation.suites import Suite, distill, row_seed, run_on_copy

HEADLINE_METRICS = (
    "execution_accuracy",
    "execution_accuracy_single_db",
    "exact_match",
    "normalized_match",
    "valid_sql_rate",
    "empty_rate",
    "runaway_rate",
)
BREAKDOWNS = {"by_complexity": "sql_complexity", "by_task_type": "sql_task_type", "by_domain": "domain"}
DEFAULT_SUITE_SIZE = 8
DEFAULT_SUITE_CANDIDATES = 64
_MIN_ROWS_PER_WORKER = 24
_AMBIGUOUS = re.compile(r"OperationalError: ambiguous column name: (?:\w+\.)?(\w+)")
_RANDOM = re.compile(r"\b(rand|random|randomblob|newid|uuid)\s*\(", re.I)
_MAX_PERMUTATIONS = 2_000
_FLOAT_DIGITS = 10


@dataclass(frozen=True)
class ScoringSettings:
    """How rows are scored: sandbox limits, the test suite (size 0 turns it off), seed, worker processes."""

    limits: Limits = field(default_factory=Limits)
    test_suite_size: int = DEFAULT_SUITE_SIZE
    suite_candidates: int = DEFAULT_SUITE_CANDIDATES
    seed: int = 0
    workers: int = 0
    """0: one per available CPU core (at most 8); 1: in this process."""
    top_domains: int = 10


def score_predictions(
    rows: list[dict],
    predictions: list[dict],
    *,
    timeout_s: float = 2.0,
    max_result_rows: int = 10_000,
    top_domains: int = 10,
    settings: ScoringSettings | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics, per-row records) for `predictions` (`{"id", "sql", optional "raw", "stopped"}`) on `rows`.

    Predictions are matched to rows by id (5 and "5" are the same id). A prediction whose id is not among the
    rows, or two predictions for one id, raise `JobError`. `sql` is passed through `extract_sql`; when a
    prediction has no `sql` key its `raw` text is used.
    """
    settings = settings or ScoringSettings(
        limits=Limits(timeout_s=timeout_s, max_rows=max_result_rows), top_domains=top_domains
    )
    return score_models(rows, {"predictions": predictions}, settings)["predictions"]


def score_models(
    rows: list[dict], predictions_by_label: dict[str, list[dict]], settings: ScoringSettings
) -> dict[str, tuple[dict, list[dict]]]:
    """`score_predictions` for several models at once: each row's database suite is built once for all of them.

    Rows are spread over `settings.workers` processes when there are enough of them to pay for the start-up.
    """
    labels = list(predictions_by_label)
    indexed = {label: _index_predictions(rows, preds) for label, preds in predictions_by_label.items()}
    per_row = [{label: indexed[label].get(id_key(row.get("id"))) for label in labels} for row in rows]
    workers = _worker_count(settings.workers, len(rows))
    if workers <= 1:
        results = [_score_row(row, preds, settings) for row, preds in zip(rows, per_row, strict=True)]
    else:
        results = _score_in_processes(rows, per_row, settings, workers)
    out = {}
    for label in labels:
        records = [result[label] for result in results]
        out[label] = (aggregate(records, top_domains=settings.top_domains, settings=settings), records)
    return out


def _worker_count(requested: int, n_rows: int) -> int:
    if n_rows < _MIN_ROWS_PER_WORKER * 2:
        return 1
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8, n_rows // _MIN_ROWS_PER_WORKER))


def _score_in_processes(rows: list[dict], per_row: list[dict], settings: ScoringSettings, workers: int) -> list:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Interleaved chunks balance slow and fast rows. Fork where there is one (as torch's DataLoader does after
    # torch has run): it needs no `if __name__ == "__main__"` guard in the caller's script; else spawn.
    n_chunks = workers * 4
    chunks = [list(range(i, len(rows), n_chunks)) for i in range(n_chunks)]
    chunks = [c for c in chunks if c]
    results: list[Any] = [None] * len(rows)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_worker_signals)
    try:
        futures = [pool.submit(_score_chunk, [rows[i] for i in c], [per_row[i] for i in c], settings) for c in chunks]
        for chunk, future in zip(chunks, futures, strict=True):
            for index, result in zip(chunk, future.result(), strict=True):
                results[index] = result
    except BaseException:  # SIGTERM (PreemptedError), Ctrl-C, a dead worker: stop the others now, not after the rest
        _stop_workers(pool)
        raise
    pool.shutdown()
    return results


def _worker_signals() -> None:
    """In a scoring worker: SIGTERM ends it at once and Ctrl-C is the parent's to handle (a fork inherits the
    parent's handlers)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: Any) -> None:
    pool.shutdown(wait=False, cancel_futures=True)
    if hasattr(pool, "terminate_workers"):  # Python 3.14+
        pool.terminate_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def _score_chunk(rows: list[dict], per_row: list[dict], settings: ScoringSettings) -> list[dict]:
    return [_score_row(row, preds, settings) for row, preds in zip(rows, per_row, strict=True)]


def aggregate(records: list[dict], *, top_domains: int = 10, settings: ScoringSettings | None = None) -> dict:
    """Headline metrics of per-row records (95% intervals in `ci95`), the suite's power, and breakdowns by
    complexity, task type and top domains."""
    metrics = _metric_set(records)
    settings = settings or ScoringSettings()
    metrics["test_suite"] = suite_power(records, settings)
    metrics["fixed_now"] = settings.limits.fixed_now
    for name, field_name in BREAKDOWNS.items():
        groups: dict[str, list[dict]] = {}
        for record in records:
            groups.setdefault(str(record.get(field_name) or "unknown"), []).append(record)
        ranked = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
        if name == "by_domain":
            ranked = ranked[:top_domains]
        metrics[name] = {group: _metric_set(members) for group, members in ranked}
    return metrics


def suite_power(records: list[dict], settings: ScoringSettings) -> dict:
    """Share of the gold's own wrong neighbours rejected by the suite, next to the row's database alone."""
    scored = [r for r in records if r["gold_error"] is None]
    neighbours = sum(r.get("n_neighbours") or 0 for r in scored)
    single = sum(r.get("neighbours_rejected_single_db") or 0 for r in scored)
    suite = sum(r.get("neighbours_rejected_suite") or 0 for r in scored)
    sizes = [r.get("suite_databases") or 0 for r in scored]
    return {
        "size": settings.test_suite_size,
        "candidates": settings.suite_candidates,
        "seed": settings.seed,
        "mean_databases": sum(sizes) / len(sizes) if sizes else None,
        "neighbours": neighbours,
        "rejected_single_db": single,
        "rejected_suite": suite,
        "power": suite / neighbours if neighbours else None,
        "power_single_db": single / neighbours if neighbours else None,
    }


def compare_metrics(base: dict, tuned: dict) -> dict:
    """tuned - base of the headline rates overall and by complexity and task type; None if one lacks it."""
    delta: dict[str, Any] = _deltas(base, tuned)
    for name in ("by_complexity", "by_task_type"):
        base_groups, tuned_groups = base.get(name) or {}, tuned.get(name) or {}
        delta[name] = {
            group: _deltas(base_groups.get(group) or {}, tuned_groups.get(group) or {})
            for group in sorted(set(base_groups) | set(tuned_groups))
        }
    return delta


def results_match(gold: QueryResult, pred: QueryResult, *, ordered: bool) -> bool:
    """Whether two successful results agree (see the module docstring for the rules)."""
    if gold.rows is not None:
        return pred.rows is not None and rows_match(gold.rows, pred.rows, ordered=ordered)
    if pred.tables is None or set(pred.tables) != set(gold.tables or {}):
        return False
    return all(
        gold.tables[name][0] == pred.tables[name][0]
        and _row_counts(gold.tables[name][1]) == _row_counts(pred.tables[name][1])
        for name in gold.tables
    )


def rows_match(gold: list[tuple], pred: list[tuple], *, ordered: bool) -> bool:
    """Same rows as multisets (or lists when `ordered`), allowing any permutation of the columns."""
    if len(gold) != len(pred):
        return False
    if not gold:
        return True
    gold_rows, pred_rows = [_canonical_row(r) for r in gold], [_canonical_row(r) for r in pred]
    width = len(gold_rows[0])
    if width != len(pred_rows[0]):
        return False
    target = gold_rows if ordered else Counter(gold_rows)
    for permutation in _column_permutations(gold_rows, pred_rows, width):
        permuted = [tuple(row[i] for i in permutation) for row in pred_rows]
        if (permuted if ordered else Counter(permuted)) == target:
            return True
    return False


def gold_is_ordered(sql: str) -> bool:
    """True when the last statement has an ORDER BY outside parentheses (row order is part of the answer)."""
    from sqlglot.tokens import Tokenizer, TokenType

    try:
        with quiet_sqlglot():
            tokens = Tokenizer().tokenize(sql)
    except Exception:  # sqlglot fails in many ways on odd text
        return bool(re.search(r"\border\s+by\b", sql, re.I))
    depth, ordered, ended = 0, False, False
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON and depth == 0:
            ended = True
            continue
        if ended:
            ordered, ended = False, False
        if token.token_type == TokenType.L_PAREN:
            depth += 1
        elif token.token_type == TokenType.R_PAREN:
            depth = max(0, depth - 1)
        elif token.token_type == TokenType.ORDER_BY and depth == 0:
            ordered = True
    return ordered


def normalize_sql(sql: str, schema: dict[str, dict[str, str]] | None = None) -> str | None:
    """Canonical text of `sql` via sqlglot (qualified against `schema` where possible); None if unparsable."""
    key = tuple(sorted((t, tuple(sorted(c.items()))) for t, c in (schema or {}).items()))
    return _normalize_cached(sql, key)


@functools.lru_cache(maxsize=2048)
def _normalize_cached(sql: str, schema_key: tuple) -> str | None:
    schema = {table: dict(columns) for table, columns in schema_key}
    import sqlglot
    from sqlglot.optimizer.normalize import normalize
    from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
    from sqlglot.optimizer.qualify import qualify
    from sqlglot.optimizer.simplify import simplify

    with quiet_sqlglot():
        for dialect in ("sqlite", None):
            try:
                expressions = [e for e in sqlglot.parse(sql, read=dialect) if e is not None]
                if not expressions:
                    return None
                parts = []
                for expression in expressions:
                    canonical = normalize_identifiers(expression, dialect="sqlite")
                    canonical = _attempt(canonical, lambda e: qualify(
                        e, schema=schema or None, dialect="sqlite", validate_qualify_columns=False,
                        quote_identifiers=False,
                    ))
                    canonical = _attempt(canonical, lambda e: simplify(normalize(e), dialect="sqlite"))
                    parts.append(canonical.sql(dialect="sqlite", normalize=True, pretty=False, comments=False))
            except Exception:  # sqlglot errors, RecursionError on deep nesting, ...: not parsable this way
                continue
            return ";".join(parts)
    return None


def _attempt(expression: Any, rewrite: Callable[[Any], Any]) -> Any:
    """`rewrite` applied to a copy, or the expression unchanged when sqlglot cannot rewrite it."""
    try:
        return rewrite(expression.copy())
    except Exception:  # sqlglot raises many kinds of errors on odd SQL
        return expression


def _score_row(row: dict, predictions: dict[str, dict | None], settings: ScoringSettings) -> dict[str, dict]:
    """Per-row records, one per model label: the gold and its suite are built once for all models.

    A failure of the scorer itself on this row (sqlglot's RecursionError on deeply nested SQL, any error of a
    rewrite) is the row's `scoring_error`, never the run's: in the context, gold or suite, the row is left out
    of execution accuracy like a failing gold; in a prediction, that prediction counts as wrong."""
    limits = settings.limits
    gold_sql = str(row.get("sql") or "")
    gold_error, gold, gold_text, gold_transpiled, ordered = None, None, gold_sql, False, False
    context, suite, schema, problem = None, Suite(), {}, None
    try:
        context = build_context(str(row.get("sql_context") or ""), limits)
        gold_error, gold, gold_text, gold_transpiled = _run_gold(context, gold_sql)
        ordered = gold_error is None and gold_is_ordered(gold_text)
        if gold_error is None and len(gold_text) > limits.max_parse_chars:
            gold_error = f"gold: longer than {limits.max_parse_chars} characters, too long to build its test suite"
        if gold_error is None:
            suite = distill(context, gold_text, gold, ordered=ordered, size=settings.test_suite_size,
                            budget=settings.suite_candidates, seed=row_seed(row.get("id"), settings.seed))
        schema = context.template.schema()
    except Exception as exc:
        problem = gold_error = _scorer_failure("gold", exc)
        gold, gold_text, gold_transpiled, ordered = None, gold_sql, False, False
    try:
        if context is None:
            context = ContextDB(template=SandboxDB(limits), error=problem)
        return {
            label: _score_prediction(row, prediction, context, schema, gold_error, gold, gold_text,
                                     gold_transpiled, ordered, suite, problem)
            for label, prediction in predictions.items()
        }
    finally:
        suite.close()
        if context is not None:
            context.close()


def _scorer_failure(where: str, exc: Exception) -> str:
    """One line for a failure inside the scorer on one row (not an error of the SQL); a SIGTERM stop passes on."""
    if isinstance(exc, PreemptedError):
        raise exc
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{where}: the scorer failed on this row ({type(exc).__name__}{': ' + detail if detail else ''})"


def _score_prediction(
    row: dict, prediction: dict | None, context: ContextDB, schema: dict, gold_error: str | None,
    gold: QueryResult | None, gold_text: str, gold_transpiled: bool, ordered: bool, suite: Suite,
    problem: str | None,
) -> dict:
    limits = context.template.limits
    gold_sql = str(row.get("sql") or "")
    prediction = prediction or {}
    text = str((prediction["sql"] if "sql" in prediction else prediction.get("raw")) or "")
    problems = [problem] if problem else []
    pred_sql, pred, pred_text, pred_transpiled, refused = "", None, "", False, None
    single_match = suite_match = None if gold_error is not None else False
    if len(text) > limits.max_sql_chars:  # refused before any parsing, as the sandbox would refuse it
        refused = f"prediction longer than {limits.max_sql_chars} characters"
    else:
        try:
            pred_sql = extract_sql(text)
            if pred_sql:
                pred, pred_text, pred_transpiled = _run_compat(context, pred_sql)
            if gold_error is None:
                valid = pred is not None and pred.ok
                single_match = valid and results_match(gold, pred, ordered=ordered)
                suite_match = single_match and all(
                    results_match(expected, run_on_copy(db, pred_text), ordered=ordered)
                    for db, expected in zip(suite.databases, suite.gold, strict=True)
                )
        except Exception as exc:
            refused = _scorer_failure("prediction", exc)
            problems.append(refused)
            single_match = suite_match = None if gold_error is not None else False
    pred_error = refused or ("empty prediction" if pred is None else pred.error)
    valid = refused is None and pred is not None and pred.ok
    exact = bool(pred_sql) and _plain(pred_sql) == _plain(gold_sql)
    normalized = exact
    if pred_sql and not exact and max(len(gold_sql), len(pred_sql)) <= limits.max_parse_chars:
        try:
            gold_norm, pred_norm = normalize_sql(gold_sql, schema), normalize_sql(pred_sql, schema)
            normalized = gold_norm is not None and gold_norm == pred_norm
        except Exception as exc:
            problems.append(_scorer_failure("normalized match", exc))
    return {
        "id": row.get("id"),
        "question": row.get("sql_prompt"),
        "gold_sql": gold_sql,
        "pred_sql": pred_sql,
        "gold_error": gold_error,
        "pred_error": pred_error,
        "exec_match": suite_match,
        "exec_match_single_db": single_match,
        "exact_match": exact,
        "normalized_match": normalized,
        "valid_sql": valid,
        "empty": not pred_sql and refused is None,
        "stopped": prediction.get("stopped"),
        "sql_complexity": row.get("sql_complexity"),
        "sql_task_type": row.get("sql_task_type"),
        "domain": row.get("domain"),
        "context_transpiled": bool(context.transpiled),
        "gold_transpiled": gold_transpiled,
        "gold_sqlite": gold_text if gold_transpiled else None,
        "pred_transpiled": pred_transpiled,
        "scoring_error": "; ".join(problems) or None,
        "suite_databases": len(suite.databases),
        "n_neighbours": suite.n_neighbours,
        "neighbours_rejected_single_db": suite.rejected_single_db,
        "neighbours_rejected_suite": suite.rejected_suite,
        "trivial": None if gold_error else suite.trivial is not None,
        "trivial_reason": suite.trivial,
    }


def _run_gold(context: ContextDB, gold_sql: str) -> tuple[str | None, QueryResult | None, str, bool]:
    """(error, result, SQLite text that ran, rewritten?) of the gold on the row's own database."""
    if context.error:
        return f"context: {context.error}", None, gold_sql, False
    gold, text, rewritten = _run_compat(context, gold_sql)
    if gold.ok and _RANDOM.search(text):
        return "gold: not deterministic (uses a random function)", None, gold_sql, False
    return (None, gold, text, rewritten) if gold.ok else (f"gold: {gold.error}", None, gold_sql, False)


def _run_compat(context: ContextDB, sql: str) -> tuple[QueryResult, str, bool]:
    """Run `sql` as written, else its first SQLite rewrite that runs (`compat.sqlite_rewrites`); SQL longer than
    `max_parse_chars` runs as written only, SQL longer than `max_sql_chars` not at all.

    Returns (result, the text that ran, whether it was rewritten); on failure, the first attempt's error.
    """
    limits = context.template.limits
    if len(sql) > limits.max_sql_chars:  # refused before any parsing, as the sandbox would refuse it
        return QueryResult(error=f"query longer than {limits.max_sql_chars} characters"), sql, False
    parsable = len(sql) <= limits.max_parse_chars
    first: tuple[QueryResult, str, bool] | None = None
    for text, rewritten in sqlite_rewrites(sql, limits.fixed_now) if parsable else iter([(sql, False)]):
        result = _run(context, text)
        ambiguous = _AMBIGUOUS.match(result.error or "") if parsable else None
        if ambiguous and (qualified := qualify_equijoined(text, ambiguous.group(1))) is not None:
            text, rewritten, result = qualified, True, _run(context, qualified)
        if result.ok:
            return result, text, rewritten
        if result.error and result.error.startswith("timeout"):
            return result, text, rewritten  # never retry what ran out of time
        first = first or (result, text, rewritten)
    return first or (QueryResult(error="no SQL statement"), sql, False)


def _run(context: ContextDB, sql: str) -> QueryResult:
    with context.fresh() as db:
        return db.run_query(sql)


def _metric_set(records: list[dict]) -> dict:
    scored = [r for r in records if r["gold_error"] is None]
    with_stop = [r for r in records if r.get("stopped") is not None]
    flags = {
        "execution_accuracy": [bool(r["exec_match"]) for r in scored],
        "execution_accuracy_single_db": [bool(r.get("exec_match_single_db", r["exec_match"])) for r in scored],
        "exact_match": [bool(r["exact_match"]) for r in records],
        "normalized_match": [bool(r["normalized_match"]) for r in records],
        "valid_sql_rate": [bool(r["valid_sql"]) for r in records],
        "empty_rate": [bool(r["empty"]) for r in records],
        "runaway_rate": [not r["stopped"] for r in with_stop],
    }
    metrics: dict[str, Any] = {
        "n_rows": len(records),
        "n_gold_failed": len(records) - len(scored),
        "n_scored": len(scored),
        **{key: _share(values) for key, values in flags.items()},
        "n_gold_transpiled": sum(bool(r.get("gold_transpiled")) for r in scored),
        "n_context_transpiled": sum(bool(r.get("context_transpiled")) for r in records),
        "n_pred_transpiled": sum(bool(r.get("pred_transpiled")) for r in records),
        "n_trivial": sum(bool(r.get("trivial")) for r in scored),
        "n_scoring_errors": sum(bool(r.get("scoring_error")) for r in records),
        "ci95": {key: bootstrap_interval(values) for key, values in flags.items()},
    }
    return metrics


def _share(flags: Iterable[bool]) -> float | None:
    values = [bool(flag) for flag in flags]
    return sum(values) / len(values) if values else None


def _deltas(base: dict, tuned: dict) -> dict[str, float | None]:
    pairs = {key: (base.get(key), tuned.get(key)) for key in HEADLINE_METRICS}
    return {key: None if b is None or t is None else t - b for key, (b, t) in pairs.items()}


def _index_predictions(rows: list[dict], predictions: list[dict]) -> dict[str, dict]:
    known = {id_key(row.get("id")) for row in rows}
    by_id: dict[str, dict] = {}
    for prediction in predictions:
        key = id_key(prediction.get("id"))
        if key not in known:
            raise JobError(f"prediction for id {prediction.get('id')!r} matches no evaluation row")
        if key in by_id:
            raise JobError(f"two predictions for id {prediction.get('id')!r}")
        by_id[key] = prediction
    return by_id


def id_key(value: object) -> str:
    """5, 5.0, "5" and " 5 " are one id; other values compare as stripped strings."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return str(int(text)) if re.fullmatch(r"[+-]?\d+", text) else text


def _plain(sql: str) -> str:
    return re.sub(r"[\s;]+$", "", " ".join(sql.lower().split()))


def _row_counts(rows: list[tuple]) -> Counter:
    return Counter(map(_canonical_row, rows))


def _canonical_row(row: tuple) -> tuple:
    return tuple(_canonical_value(value) for value in row)


def _canonical_value(value: object) -> object:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return repr(value)
        value = float(f"{value:.{_FLOAT_DIGITS}g}")
        return int(value) if value.is_integer() else value
    return value


def _column_permutations(gold: list[tuple], pred: list[tuple], width: int) -> Iterable[tuple[int, ...]]:
    """Orders of pred's columns worth trying: each pred column maps to a gold column with the same values."""
    gold_columns = [Counter(row[i] for row in gold) for i in range(width)]
    pred_columns = [Counter(row[i] for row in pred) for i in range(width)]
    # candidates[g] = pred columns whose multiset of values equals gold column g's
    candidates = [[p for p in range(width) if pred_columns[p] == gold_columns[g]] for g in range(width)]
    if any(not options for options in candidates):
        return
    yield from itertools.islice(_distinct_choices(candidates, ()), _MAX_PERMUTATIONS)


def _distinct_choices(candidates: list[list[int]], chosen: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
    if len(chosen) == len(candidates):
        yield chosen
        return
    for option in candidates[len(chosen)]:
        if option not in chosen:
            yield from _distinct_choices(candidates, (*chosen, option))


def compare_paired(base_records: list[dict], tuned_records: list[dict]) -> dict[str, dict]:
    """tuned vs base on the rows both scored: exact McNemar test and paired-bootstrap interval, per accuracy."""
    from job.evaluation.confidence import paired_comparison

    base_by_id = {id_key(r.get("id")): r for r in base_records if r["gold_error"] is None}
    pairs = [(base_by_id[id_key(r.get("id"))], r) for r in tuned_records
             if r["gold_error"] is None and id_key(r.get("id")) in base_by_id]
    fields = {"execution_accuracy": "exec_match", "execution_accuracy_single_db": "exec_match_single_db"}
    return {
        metric: paired_comparison([bool(b.get(field)) for b, _ in pairs], [bool(t.get(field)) for _, t in pairs])
        for metric, field in fields.items()
    }
