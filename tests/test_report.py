"""Reports: metrics.json with deltas, markdown tables, a self-contained HTML page with inline charts."""

from __future__ import annotations

import base64
import json
import re

import pytest

from job.evaluation.report import headline_markdown, write_reports
from job.evaluation.scoring import compare_metrics, score_predictions

CONTEXT = "CREATE TABLE t (a INT, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y');"
HOSTILE_QUESTION = "<script>alert('q')</script> & friends?"


def _rows() -> list[dict]:
    specs = [("basic SQL", "SELECT a FROM t"), ("aggregation", "SELECT COUNT(*) FROM t"),
             ("aggregation", "SELECT MAX(a) FROM t"), ("basic SQL", "SELECT nope FROM t")]
    return [
        {"id": i, "sql_prompt": HOSTILE_QUESTION if i == 0 else f"question {i}", "sql_context": CONTEXT,
         "sql": gold, "sql_complexity": complexity, "sql_task_type": "analytics and reporting", "domain": "d"}
        for i, (complexity, gold) in enumerate(specs)
    ]


@pytest.fixture(scope="module")
def scored() -> tuple[dict, dict]:
    rows = _rows()
    base_preds = [{"id": 0, "sql": "SELECT a FROM t", "stopped": True},
                  {"id": 1, "sql": "", "stopped": False},
                  {"id": 2, "sql": "SELECT MIN(a) FROM t", "stopped": True}]
    tuned_preds = [{"id": 0, "sql": "SELECT '<b>' FROM t", "stopped": True},
                   {"id": 1, "sql": "SELECT COUNT(a) FROM t", "stopped": True},
                   {"id": 2, "sql": "SELECT MAX(a) FROM t", "stopped": True}]
    base, base_rows = score_predictions(rows, base_preds)
    tuned, tuned_rows = score_predictions(rows, tuned_preds)
    return {"base": base, "tuned": tuned}, {"base": base_rows, "tuned": tuned_rows}


def test_writes_metrics_markdown_and_self_contained_html(scored, tmp_path) -> None:
    metrics, rows = scored
    log = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.2}, {"step": 2, "eval_loss": 1.4},
           {"step": 3, "loss": 0.9}]
    write_reports(tmp_path / "eval", metrics, rows, train_log=log, title="Run <1>")

    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(summary) == {"base", "tuned", "delta"}
    paired = summary["delta"].pop("paired")
    assert summary["delta"] == compare_metrics(metrics["base"], metrics["tuned"])
    assert summary["delta"]["execution_accuracy"] == pytest.approx(1 / 3)  # 1/3 -> 2/3 of 3 scored rows
    # tuned alone is right on rows 1 and 2, base alone on row 0: p = 2 * P(Binomial(3, 1/2) <= 1) = 1
    assert paired["execution_accuracy"]["tuned_only"] == 2 and paired["execution_accuracy"]["base_only"] == 1
    assert paired["execution_accuracy"]["p_value"] == 1.0 and paired["execution_accuracy"]["within_noise"]
    assert summary["tuned"]["vs_base"] == paired
    assert summary["base"]["ci95"]["execution_accuracy"][0] <= 1 / 3 <= summary["base"]["ci95"]["execution_accuracy"][1]

    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "| Metric | base | tuned | Δ (tuned - base) |" in markdown
    assert re.search(r"\| Execution accuracy \(test suite\) \| 33\.3% \[[\d.]+–[\d.]+\] \| 66\.7% \[[\d.]+–[\d.]+\] "
                     r"\| \+33\.3 pp \(McNemar p = 1\) \|", markdown)
    assert "| Execution accuracy (single DB) | 33.3%" in markdown
    assert re.search(r"\| Runaway \(no stop\) \| 33\.3% \[[\d.]+–[\d.]+\] \| 0\.0% \[0\.0–0\.0\] \| -33\.3 pp \|",
                     markdown)
    assert "is within noise on these 3 rows" in markdown
    assert "the suite rejects" in markdown and "Now\" is fixed at 2024-01-15 12:00:00" in markdown
    assert "gold SQL does not run in SQLite" in markdown and "base: 1, tuned: 1" in markdown
    assert "## Rows left out (1)" in markdown and "- id 3: `gold: OperationalError: no such column: nope`" in markdown
    assert "## Execution accuracy (test suite) by SQL complexity" in markdown and "| aggregation | 2 |" in markdown
    assert "SELECT '<b>' FROM t" in markdown  # the tuned model's miss is among the worst examples
    assert "<script>" not in markdown

    page = (tmp_path / "eval" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # accuracies with error bars, by complexity, by task type, training loss
    assert all(base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?data:)""", page), "HTML must load nothing external"
    assert "http" not in page.replace("data:image/png", "")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;q&#x27;)&lt;/script&gt; &amp; friends?" in page
    assert "SELECT &#x27;&lt;b&gt;&#x27; FROM t" in page and "Run &lt;1&gt;" in page


def test_works_with_a_single_model_and_no_training_log(scored, tmp_path) -> None:
    metrics, rows = scored
    write_reports(tmp_path, {"tuned": metrics["tuned"]}, {"tuned": rows["tuned"]})
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert set(summary) == {"tuned"}
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "| Metric | tuned |" in (tmp_path / "report.md").read_text()


def test_headline_markdown_table() -> None:
    base = {"execution_accuracy": 0.5, "exact_match": 0.1, "normalized_match": 0.2, "valid_sql_rate": 0.9,
            "empty_rate": 0.0, "runaway_rate": None, "n_rows": 10, "n_gold_failed": 2, "n_scored": 8}
    table = headline_markdown({"base": base, "tuned": {**base, "execution_accuracy": 0.75}})
    lines = table.strip().splitlines()
    assert lines[0] == "| Metric | base | tuned | Δ (tuned - base) |"
    assert "| Execution accuracy (test suite) | 50.0% | 75.0% | +25.0 pp |" in lines
    assert "| n_gold_failed | 2 | 2 | +0 |" in lines
    assert not any("Runaway" in line for line in lines)  # no generation info: the row is left out
    single = headline_markdown({"base": base})
    assert single.splitlines()[0] == "| Metric | base |" and "| Execution accuracy (test suite) | 50.0% |" in single
    assert headline_markdown({"base": base, "delta": {"execution_accuracy": 0.1}}).splitlines()[0] == \
        "| Metric | base |"  # non-model entries of a metrics dict are not columns


def test_trivial_rows_are_counted_and_listed_apart(tmp_path) -> None:
    rows = [*_rows()[:3], {**_rows()[0], "id": 9, "sql": "SELECT b FROM t WHERE a > 5 AND a < 3"}]
    metrics, records = score_predictions(rows, [{"id": r["id"], "sql": r["sql"]} for r in rows])
    assert metrics["n_trivial"] == 1 and metrics["n_scored"] == 4 and metrics["execution_accuracy"] == 1.0
    write_reports(tmp_path, {"tuned": metrics}, {"tuned": records})
    markdown = (tmp_path / "report.md").read_text()
    assert "| n_trivial (a constant could match) | 1 |" in markdown
    assert "## Trivial rows (1)" in markdown
    assert "- id 9: empty result on every database: `SELECT b FROM t WHERE a > 5 AND a < 3`" in markdown
    assert "| basic SQL | 2 | 100.0% [100.0–100.0] (n=2, 1 trivial) |" in markdown
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Trivial rows (1)</h2>" in page
    assert "<li>id 9: empty result on every database: <code>SELECT b FROM t WHERE a &gt; 5 AND a &lt; 3</code>" in page
    assert json.loads((tmp_path / "metrics.json").read_text())["tuned"]["by_complexity"]["basic SQL"]["n_trivial"] == 1
