"""Scoring: the test-suite scorer vs the single-database scorer on the 400 shipped rows, in the same run.

Usage: python benchmarks/bench_scoring.py  (prints the BENCHMARKS.md section; `benchmarks/run_all.py` runs it as
phase `scoring`). Each mode runs in a fresh process so its peak memory is its own. Timed: scoring the gold
queries as predictions (every prediction matches on its own database, so every suite database is run: the slowest
case). Untimed, in the suite run: the constant predictors of `bench_constants.py` on the shipped and on 100 held-out
rows, to show what each metric lets through.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peak_memory import own_peak_rss_kb

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = ROOT / "tests" / "data" / "gretel_holdout.jsonl"
"""100 real rows the suites were not built on (tests/data/PROVENANCE.md)."""
MODES = {
    "single_db": {"test_suite_size": 0, "workers": 1},
    "suite_one_process": {"workers": 1},
    "suite": {"workers": 0},
}
LABELS = {
    "single_db": "single-DB scorer (baseline: `evaluation.test_suite_size=0`), 1 process",
    "suite_one_process": "test-suite scorer (default suite), 1 process",
    "suite": "test-suite scorer (default suite), one process per core",
}


def _child(mode: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from job.evaluation.scoring import ScoringSettings, score_models
    from job.settings import shipped_sample

    rows = [json.loads(line) for line in shipped_sample().read_text().splitlines()]
    settings = ScoringSettings(**MODES[mode])
    gold = {"gold": [{"id": r["id"], "sql": r["sql"]} for r in rows]}
    start = time.monotonic()
    metrics, _ = score_models(rows, gold, settings)["gold"]
    seconds = time.monotonic() - start
    out: dict[str, Any] = {"seconds": seconds, "rows": len(rows), "n_scored": metrics["n_scored"],
                           "gold_accuracy": metrics["execution_accuracy"], "test_suite": metrics["test_suite"]}
    if mode == "suite":
        import bench_constants

        holdout = [json.loads(line) for line in HOLDOUT.read_text().splitlines()]
        for name, these in (("shipped", rows), ("holdout", holdout)):
            measured = bench_constants.measure(these, settings.workers)
            out[name] = {
                **{k: measured[k] for k in ("rows", "n_scored", "n_trivial", "test_suite")},
                "constants": {label: {k: c[k] for k in ("sql", "execution_accuracy", "execution_accuracy_single_db",
                                                         "ci95")} | {"passed": len(c["passed"])}
                              for label, c in measured["constants"].items()},
            }
    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out["peak_rss_mb"] = own_peak_rss_kb() / 1024
    out["peak_worker_rss_mb"] = usage_children / 1024 if usage_children else None
    return out


def run() -> dict[str, Any]:
    """Every mode in its own process; the load average shows how busy the machine was."""
    results: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0]}
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, f"--mode={mode}"], cwd=ROOT, check=True, text=True,
                              capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    results["load_after"] = os.getloadavg()[0]
    return results


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"


def markdown(r: dict[str, Any]) -> str:
    single, suite = r["single_db"], r["suite"]
    power = suite["test_suite"]
    rows = "\n".join(
        f"| {LABELS[mode]} | {r[mode]['seconds']:.1f} s | {r[mode]['seconds'] / single['seconds']:.1f}x | "
        f"{r[mode]['peak_rss_mb']:.0f} MB"
        + (f" (+ {r[mode]['peak_worker_rss_mb']:.0f} MB per worker)" if r[mode].get("peak_worker_rss_mb") else "")
        + " |"
        for mode in MODES
    )
    shipped, holdout = suite["shipped"], suite["holdout"]
    constants = "\n".join(
        f"| `{c['sql'].replace('{table}', '<first table>')}` | "
        + " | ".join(f"{_pct(m['constants'][key]['execution_accuracy'])}{_ci(m['constants'][key]['ci95'])} | "
                     f"{_pct(m['constants'][key]['execution_accuracy_single_db'])}" for m in (shipped, holdout))
        + " |"
        for key, c in shipped["constants"].items()
    )
    return f"""## 5. Scoring: test-suite execution accuracy vs the single database

`python benchmarks/bench_scoring.py` (phase `scoring` of `make bench`): the {suite['rows']} shipped rows
({suite['n_scored']} scorable; gold scores {_pct(suite['gold_accuracy'])}), the gold queries as predictions (every
one matches on its own database, so every suite database runs: the slowest case). Each mode in a fresh process;
{r['cores']} cores, load average {r['load_before']:.1f} before and {r['load_after']:.1f} after (on a busy machine
absolute times grow: the ratios, measured in the same run, are the point).

| scorer | wall time | vs single-DB | peak memory (RSS) |
|---|---|---|---|
{rows}

Suite power: the default suite (up to {power['size']} databases per row, {power['candidates']} candidates,
mean {power['mean_databases']:.2f} kept) rejects **{_pct(power['power'])}** of the {power['neighbours']} wrong
neighbours of the gold queries; the row's own database alone rejects {_pct(power['power_single_db'])}.

Predictions that ignore the question (`python benchmarks/bench_constants.py [--rows FILE]` lists the rows each
one passes, and why), on the shipped rows and on 100 real rows not shipped (`tests/data/gretel_holdout.jsonl`; the
general defects they exposed were fixed, see its PROVENANCE.md; suite power there
{_pct(holdout['test_suite']['power'])}). Rows where no database could make the gold's answer one a constant cannot
match are reported as trivial (`n_trivial`): shipped {shipped['n_trivial']} of {shipped['n_scored']}, held out
{holdout['n_trivial']} of {holdout['n_scored']}.

| constant (95% interval) | shipped: test suite | shipped: single DB | held out: test suite | held out: single DB |
|---|---|---|---|---|
{constants}
"""


if __name__ == "__main__":
    mode_arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--mode=")), None)
    if mode_arg:
        print(json.dumps(_child(mode_arg)))
    else:
        measured = run()
        (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
        (ROOT / "runs" / "bench" / "scoring.json").write_text(json.dumps(measured, indent=2))
        print(markdown(measured))
