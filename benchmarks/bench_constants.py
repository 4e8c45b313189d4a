"""Constant predictors against the test-suite scorer: what a prediction that ignores the question still scores.

Usage: python benchmarks/bench_constants.py [--rows FILE] [--workers N] [--json OUT]
(default rows: the 400 shipped ones). Scores, in one run (each row's suite is built once), the gold queries, every
constant of `CONSTANTS`, and the gold's own answer hard-coded as literals (`literal_answer`). Prints each one's
test-suite and single-database accuracy; the rows the scorer reports as trivial (`n_trivial`: no database gives
the gold an answer a constant cannot guess); the suite's power on the gold's own wrong neighbours; the scoring
time; and every row some constant matches on every database, with why: the constant is the gold query itself,
the record's `trivial_reason`, or "suite missed it" when the gold's answer is not trivial but the constant's
equals it everywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONSTANTS = {
    "empty": "SELECT * FROM {table} WHERE 1=0",
    "star": "SELECT * FROM {table}",
    "count": "SELECT COUNT(*) FROM {table}",
    "null": "SELECT NULL",
    "zero": "SELECT 0",
    "one": "SELECT 1",
    "noop_dml": "DELETE FROM {table} WHERE 1=0",
}
"""Predictions that depend on the schema at most (its first table), never on the question."""
ANSWER = "VALUES <the gold's answer on the row's own database>"


def first_table(context: str) -> str:
    """The first table a `sql_context` creates (what a constant predictor can know without reading the question)."""
    match = re.search(r"create\s+table\s+(?:if\s+not\s+exists\s+)?([\w.`\"]+)", context, re.I)
    return match.group(1).split(".")[-1].strip('`"') if match else "t"


def literal_answer(row: dict) -> str:
    """The gold's answer on the row's own database written as literals (`VALUES ...`): a prediction that hard-codes
    what the context's INSERTs give. Empty when the gold fails, changes data, or returns no or over 50 rows."""
    from job.evaluation.sandbox import build_context
    from job.evaluation.scoring import _run_gold

    context = build_context(str(row.get("sql_context") or ""))
    try:
        error, result, _, _ = _run_gold(context, str(row.get("sql") or ""))
    finally:
        context.close()
    if error or result is None or not result.rows or len(result.rows) > 50:
        return ""
    return "VALUES " + ", ".join("(" + ", ".join(map(_literal, r)) + ")" for r in result.rows)


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def measure(rows: list[dict], workers: int = 0) -> dict[str, Any]:
    """Gold and every constant scored on `rows` in one run; per constant, its metrics and the rows it passes."""
    sys.path.insert(0, str(ROOT))
    from job.evaluation.scoring import ScoringSettings, score_models

    predictions = {"gold": [{"id": r["id"], "sql": r["sql"]} for r in rows]}
    for label, template in CONSTANTS.items():
        predictions[label] = [{"id": r["id"], "sql": template.format(table=first_table(r["sql_context"]))}
                              for r in rows]
    predictions["answer"] = [{"id": r["id"], "sql": literal_answer(r)} for r in rows]
    start = time.monotonic()
    scores = score_models(rows, predictions, ScoringSettings(workers=workers))
    seconds = time.monotonic() - start
    gold_metrics, gold_records = scores["gold"]
    out: dict[str, Any] = {
        "rows": len(rows), "n_scored": gold_metrics["n_scored"], "n_trivial": gold_metrics["n_trivial"],
        "gold_accuracy": gold_metrics["execution_accuracy"], "test_suite": gold_metrics["test_suite"],
        "seconds": seconds, "constants": {},
        "trivial_rows": [{"id": r["id"], "why": r["trivial_reason"], "gold": r["gold_sql"]}
                         for r in gold_records if r.get("trivial")],
    }
    for label in [*CONSTANTS, "answer"]:
        metrics, records = scores[label]
        passed = [
            {"id": r["id"], "why": _why(r, g), "gold": r["gold_sql"]}
            for r, g in zip(records, gold_records, strict=True) if r["exec_match"]
        ]
        out["constants"][label] = {
            "sql": CONSTANTS.get(label, ANSWER), "execution_accuracy": metrics["execution_accuracy"],
            "execution_accuracy_single_db": metrics["execution_accuracy_single_db"],
            "ci95": metrics["ci95"]["execution_accuracy"], "passed": passed,
        }
    return out


def _why(record: dict, gold_record: dict) -> str:
    if record["normalized_match"]:
        return "the constant is the gold query itself"
    return gold_record["trivial_reason"] or "suite missed it (the gold's answer is not trivial)"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(r: dict[str, Any]) -> str:
    power = r["test_suite"]
    lines = [
        f"{r['rows']} rows, {r['n_scored']} scorable (gold scores {_pct(r['gold_accuracy'])}); "
        f"n_trivial {r['n_trivial']}; suite power {_pct(power['power'])} of {power['neighbours']} neighbours "
        f"(single DB {_pct(power['power_single_db'])}), mean {power['mean_databases']:.2f} databases; "
        f"scored in {r['seconds']:.1f} s.",
        "",
        "| constant predictor | test-suite accuracy (95% interval) | single-DB accuracy | rows passed |",
        "|---|---|---|---|",
    ]
    for c in r["constants"].values():
        interval = f" [{100 * c['ci95'][0]:.1f}–{100 * c['ci95'][1]:.1f}]" if c["ci95"] else ""
        lines.append(f"| `{c['sql']}` | {_pct(c['execution_accuracy'])}{interval} | "
                     f"{_pct(c['execution_accuracy_single_db'])} | {len(c['passed'])} |")
    lines += ["", "Rows a constant passes on every database:"]
    for label, c in r["constants"].items():
        lines += [f"- {label} `{c['sql']}`: id {p['id']}: {p['why']}: `{p['gold']}`" for p in c["passed"]]
    lines += ["", "Rows reported trivial (no database gives the gold an answer a constant cannot guess):"]
    lines += [f"- id {t['id']}: {t['why']}: `{t['gold']}`" for t in r["trivial_rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, help="JSON-lines rows (default: the shipped sample)")
    parser.add_argument("--workers", type=int, default=0, help="scoring processes (0: one per core, at most 8)")
    parser.add_argument("--json", type=Path, help="also write the measurement here as JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from job.settings import shipped_sample

    path = args.rows or shipped_sample()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    result = measure(rows, args.workers)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
