"""Evaluation reports: `metrics.json`, `report.md` and a self-contained `report.html` (charts inline)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from job.evaluation.scoring import HEADLINE_METRICS, compare_metrics, compare_paired

_LABELS = {
    "execution_accuracy": "Execution accuracy (test suite)",
    "execution_accuracy_single_db": "Execution accuracy (single DB)",
    "exact_match": "Exact match",
    "normalized_match": "Normalized match",
    "valid_sql_rate": "Valid SQL",
    "empty_rate": "Empty output",
    "runaway_rate": "Runaway (no stop)",
    "n_trivial": "n_trivial (a constant could match)",
}
_COUNTS = ("n_rows", "n_gold_failed", "n_scored", "n_trivial")
_DEFINITIONS = (
    "Execution accuracy (test suite) counts a prediction correct only when its result matches the gold's on the "
    "row's own database and on every database of the row's distilled test suite (same schema, generated rows; "
    "Zhong, Yu & Klein 2020); execution accuracy (single DB) compares on the row's own database only, which a "
    "constant empty answer often passes. Both are over scored rows (gold SQL runs on its own context in SQLite); "
    "every other rate is over all rows, except runaway, which is over rows with generation info. "
    "`n_gold_failed` rows (context or gold SQL fails in SQLite) are excluded from execution accuracy only. "
    "`n_trivial` rows are scored rows where no database could be built on which the gold's answer is one a "
    "constant cannot match (empty, only NULL/0, no change, or the same answer everywhere): they count in "
    "`n_scored` and are listed apart. Brackets are 95% bootstrap intervals."
)
_WORST_LIMIT = 10


def write_reports(
    eval_dir: Path,
    metrics_by_model: dict[str, dict],
    rows_by_model: dict[str, list[dict]],
    train_log: list[dict] | None = None,
    title: str = "Text-to-SQL evaluation",
) -> None:
    """Write `metrics.json`, `report.md` and `report.html` for one or more models (e.g. "base", "tuned").

    With both "base" and "tuned", the paired test of tuned vs base is added to the tuned metrics as `vs_base`."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    if "base" in rows_by_model and "tuned" in rows_by_model and "tuned" in metrics_by_model:
        metrics_by_model["tuned"]["vs_base"] = compare_paired(rows_by_model["base"], rows_by_model["tuned"])
    summary: dict[str, Any] = dict(metrics_by_model)
    if "base" in metrics_by_model and "tuned" in metrics_by_model:
        summary["delta"] = compare_metrics(metrics_by_model["base"], metrics_by_model["tuned"])
        summary["delta"]["paired"] = metrics_by_model["tuned"].get("vs_base")
    (eval_dir / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    worst_label, worst = worst_examples(metrics_by_model, rows_by_model)
    excluded, trivial = _excluded(rows_by_model), _trivial(rows_by_model)
    text = {"report.md": _markdown(title, metrics_by_model, worst_label, worst, excluded, trivial),
            "report.html": _html(title, metrics_by_model, worst_label, worst, train_log, excluded, trivial)}
    for name, content in text.items():  # a lone surrogate in the data is written escaped, never a crash
        (eval_dir / name).write_text(content, encoding="utf-8", errors="backslashreplace")


def headline_line(label: str, m: dict[str, Any]) -> str:
    """One terminal line with a model's headline numbers."""
    runaway = f", runaway {m['runaway_rate']:.1%}" if m.get("runaway_rate") is not None else ""
    single = m.get("execution_accuracy_single_db")
    single_text = f", single-DB {_pct(single)}" if single is not None else ""
    return (
        f"{label}: execution accuracy (test suite) {_pct(m['execution_accuracy'])}"
        f"{_interval(m, 'execution_accuracy')}{single_text} of {m['n_scored']} scored rows "
        f"({m['n_gold_failed']} with failing gold left out), exact {_pct(m['exact_match'])}, "
        f"valid SQL {_pct(m['valid_sql_rate'])}{runaway}"
    )


def _pct(value: Any) -> str:
    return "–" if value is None else f"{value:.1%}"


def _interval(m: dict[str, Any], key: str) -> str:
    low_high = (m.get("ci95") or {}).get(key)
    return f" [95% CI {100 * low_high[0]:.1f}–{100 * low_high[1]:.1f}]" if low_high else ""


def noise_statements(metrics_by_model: dict[str, dict]) -> list[str]:
    """The paired test of tuned vs base in words, one sentence per execution accuracy; [] without both models."""
    paired = (metrics_by_model.get("tuned") or {}).get("vs_base") or {}
    return [f"{_LABELS[key]}: {paired[key]['statement']}" for key in ("execution_accuracy",
            "execution_accuracy_single_db") if (paired.get(key) or {}).get("statement")]


def suite_statement(metrics: dict[str, Any]) -> str:
    """What the test suite is and how much it catches, in two sentences."""
    suite = metrics.get("test_suite") or {}
    if not suite.get("size"):
        return "Test suites are off (`evaluation.test_suite_size=0`): both execution accuracies are single-DB."
    power, single = suite.get("power"), suite.get("power_single_db")
    return (
        f"Test suite: up to {suite['size']} extra databases per row (mean {suite.get('mean_databases') or 0:.1f}, "
        f"distilled from {suite.get('candidates')} candidates, seed {suite.get('seed')}). Of "
        f"{suite.get('neighbours')} wrong neighbours of the gold queries (aggregate, literal, comparison, boolean, "
        f"ordering, dropped/added clause), the suite rejects {_pct(power)}; the row's own database alone rejects "
        f"{_pct(single)}. \"Now\" is fixed at {metrics.get('fixed_now')}."
    )


def rewrite_statement(metrics_by_model: dict[str, dict]) -> str:
    """How many rows needed sqlglot/compatibility rewrites to run in SQLite."""
    first = next(iter(metrics_by_model.values()))
    predictions = ", ".join(f"{m}: {v.get('n_pred_transpiled', 0)}" for m, v in metrics_by_model.items())
    return (
        f"Rewritten to run in SQLite (sqlglot transpilation, MySQL-compatible functions, schema prefixes dropped): "
        f"{first.get('n_gold_transpiled', 0)} gold queries, {first.get('n_context_transpiled', 0)} contexts, "
        f"predictions {predictions}. Rewritten rows are flagged `gold_transpiled`, `context_transpiled` and "
        "`pred_transpiled` in the per-row records."
    )


def headline_markdown(metrics_by_model: dict[str, dict]) -> str:
    """Headline metrics as markdown: one column per model with 95% intervals, plus Δ (tuned - base) and the paired
    test's p-value when both exist, then the noise verdict and the test suite's power in words."""
    metrics_by_model = _models(metrics_by_model)
    models = list(metrics_by_model)
    with_delta = "base" in metrics_by_model and "tuned" in metrics_by_model
    header = ["Metric", *models, *(["Δ (tuned - base)"] if with_delta else [])]
    lines = [_md_row(header), _md_row(["---"] + ["---:"] * (len(header) - 1))]
    for _key, label, cells in _headline_cells(metrics_by_model):
        lines.append(_md_row([label, *cells]))
    text = "\n".join(lines) + "\n"
    notes = noise_statements(metrics_by_model)
    if models:
        notes.append(suite_statement(metrics_by_model[models[-1]]))
    return text + "".join(f"\n{note}\n" for note in notes)


def _models(metrics_by_model: dict[str, dict]) -> dict[str, dict]:
    """Only the per-model entries (a caller's dict may also hold e.g. "delta")."""
    return {m: v for m, v in metrics_by_model.items() if isinstance(v, dict) and "n_rows" in v}


def _headline_cells(metrics_by_model: dict[str, dict]) -> list[tuple[str, str, list[str]]]:
    models = list(metrics_by_model)
    with_delta = "base" in metrics_by_model and "tuned" in metrics_by_model
    paired = (metrics_by_model.get("tuned") or {}).get("vs_base") or {}
    rows = []
    for key in (*HEADLINE_METRICS, *_COUNTS):
        values = [metrics_by_model[m].get(key) for m in models]
        if key == "runaway_rate" and all(v is None for v in values):
            continue
        cells = [_fmt(key, v) + _ci_text(metrics_by_model[m], key) for m, v in zip(models, values, strict=True)]
        if with_delta:
            base, tuned = metrics_by_model["base"].get(key), metrics_by_model["tuned"].get(key)
            delta = _fmt_delta(key, base, tuned)
            if (paired.get(key) or {}).get("p_value") is not None:
                delta += f" (McNemar p = {paired[key]['p_value']:.2g})"
            cells.append(delta)
        rows.append((key, _LABELS.get(key, key), cells))
    return rows


def _ci_text(metrics: dict[str, Any], key: str) -> str:
    low_high = (metrics.get("ci95") or {}).get(key)
    return f" [{100 * low_high[0]:.1f}–{100 * low_high[1]:.1f}]" if low_high else ""


def worst_examples(
    metrics_by_model: dict[str, dict], rows_by_model: dict[str, list[dict]], limit: int = _WORST_LIMIT
) -> tuple[str | None, list[dict]]:
    """(model, misses) of "tuned", else the last model,: regressions vs base, then errors, then wrong rows."""
    labels = [m for m in metrics_by_model if m in rows_by_model]
    if not labels:
        return None, []
    label = "tuned" if "tuned" in labels else labels[-1]
    base_hits = {str(r.get("id")) for r in rows_by_model.get("base", []) if r.get("exec_match")}
    misses = [r for r in rows_by_model[label] if r.get("exec_match") is False]

    def rank(record: dict) -> tuple[int, int]:
        regression = label != "base" and str(record.get("id")) in base_hits
        return (0 if regression else 1, 0 if record.get("pred_error") else 1)

    return label, sorted(misses, key=rank)[:limit]


def _excluded(rows_by_model: dict[str, list[dict]]) -> list[dict]:
    """Rows left out of execution accuracy (their context or gold fails in SQLite), the same for every model."""
    records = next(iter(rows_by_model.values()), [])
    return [r for r in records if r.get("gold_error")]


def _trivial(rows_by_model: dict[str, list[dict]]) -> list[dict]:
    """Scored rows a constant could match (`trivial`), the same for every model: the suite is built per row."""
    records = next(iter(rows_by_model.values()), [])
    return [r for r in records if r.get("trivial")]


_TRIVIAL_NOTE = ("Scored as usual and counted in `n_scored`, but no database could be built on which the gold's "
                 "answer is one a constant cannot match, so a hit on them says little.")


def _markdown(
    title: str, metrics_by_model: dict[str, dict], label: str | None, worst: list[dict], excluded: list[dict],
    trivial: list[dict],
) -> str:
    parts = [f"# {_md_text(title)}\n", headline_markdown(metrics_by_model), f"{_DEFINITIONS}\n",
             f"{rewrite_statement(metrics_by_model)}\n"]
    failed = {m: metrics.get("n_gold_failed") for m, metrics in metrics_by_model.items()}
    parts.append(
        "Rows whose gold SQL does not run in SQLite even after rewriting (missing tables or columns, ambiguous "
        "names, invalid SQL): " + ", ".join(f"{m}: {n}" for m, n in failed.items())
        + ". They are listed below and with `gold_error` in the per-row records.\n"
    )
    sections = (("by_complexity", "SQL complexity"), ("by_task_type", "task type"), ("by_domain", "domain"))
    for name, heading in sections:
        parts.append(f"## Execution accuracy (test suite) by {heading}\n")
        parts.append(_breakdown_markdown(metrics_by_model, name, heading))
    parts.append(f"## Rows left out ({len(excluded)})\n")
    parts.extend(f"- id {_md_text(r.get('id'))}: `{_md_inline(str(r.get('gold_error'))[:160])}`\n" for r in excluded)
    parts.append(f"## Trivial rows ({len(trivial)})\n\n{_TRIVIAL_NOTE}\n")
    parts.extend(f"- id {_md_text(r.get('id'))}: {_md_text(r.get('trivial_reason'))}: "
                 f"`{_md_inline(r.get('gold_sql'))[:160]}`\n" for r in trivial)
    parts.append(f"## Worst examples ({_md_text(label or 'none')})\n")
    if not worst:
        parts.append("No misses.\n")
    for record in worst:
        parts.append(
            f"- **{_md_text(record.get('question'))}** "
            f"(id {_md_text(record.get('id'))}, {_md_text(record.get('sql_complexity'))})\n"
            f"  - gold: `{_md_inline(record.get('gold_sql'))}`\n"
            f"  - prediction: `{_md_inline(record.get('pred_sql') or '(empty)')}`\n"
            + (f"  - error: `{_md_inline(record.get('pred_error'))}`\n" if record.get("pred_error") else "")
        )
    return "\n".join(parts)


def _breakdown_markdown(metrics_by_model: dict[str, dict], name: str, heading: str) -> str:
    models = list(metrics_by_model)
    groups = _groups(metrics_by_model, name)
    with_delta = "base" in metrics_by_model and "tuned" in metrics_by_model
    header = [heading[0].upper() + heading[1:], "rows", *models, *(["Δ"] if with_delta else [])]
    lines = [_md_row(header), _md_row(["---"] + ["---:"] * (len(header) - 1))]
    for group in groups:
        stats = [(metrics_by_model[m].get(name) or {}).get(group) or {} for m in models]
        n_rows = next((s.get("n_rows") for s in stats if s), 0)
        accuracy = [s.get("execution_accuracy") for s in stats]
        cells = [
            f"{_fmt('execution_accuracy', a)}{_ci_text(s, 'execution_accuracy')} (n={s.get('n_scored', 0)}"
            + (f", {s['n_trivial']} trivial)" if s.get("n_trivial") else ")")
            for a, s in zip(accuracy, stats, strict=True)
        ]
        if with_delta:
            cells.append(_fmt_delta("execution_accuracy", accuracy[models.index("base")],
                                    accuracy[models.index("tuned")]))
        lines.append(_md_row([_md_text(group), str(n_rows), *cells]))
    return "\n".join(lines) + "\n"


def _html(
    title: str,
    metrics_by_model: dict[str, dict],
    label: str | None,
    worst: list[dict],
    train_log: list[dict] | None,
    excluded: list[dict],
    trivial: list[dict],
) -> str:
    esc = html.escape
    models = list(metrics_by_model)
    with_delta = "base" in metrics_by_model and "tuned" in metrics_by_model
    head = "".join(f"<th>{esc(m)}</th>" for m in models) + ("<th>Δ (tuned - base)</th>" if with_delta else "")
    body = [
        f"<tr><th>{esc(label)}</th>" + "".join(f"<td>{esc(cell)}</td>" for cell in cells) + "</tr>"
        for _, label, cells in _headline_cells(metrics_by_model)
    ]
    notes = [*noise_statements(metrics_by_model), suite_statement(metrics_by_model[models[-1]]),
             rewrite_statement(metrics_by_model)] if models else []
    excluded_items = "".join(f"<li>id {esc(str(r.get('id')))}: <code>{esc(str(r.get('gold_error'))[:160])}</code></li>"
                             for r in excluded)
    trivial_items = "".join(f"<li>id {esc(str(r.get('id')))}: {esc(str(r.get('trivial_reason')))}: "
                            f"<code>{esc(str(r.get('gold_sql'))[:160])}</code></li>" for r in trivial)
    charts = [
        _img(_headline_chart(metrics_by_model), "Accuracies with 95% intervals"),
        _img(_bar_chart(metrics_by_model, "by_complexity", "Execution accuracy (test suite) by SQL complexity"),
             "Execution accuracy (test suite) by SQL complexity"),
        _img(_bar_chart(metrics_by_model, "by_task_type", "Execution accuracy (test suite) by task type"),
             "Execution accuracy (test suite) by task type"),
    ]
    loss = [e for e in train_log or [] if isinstance(e, dict) and "step" in e and e.get("loss") is not None]
    if loss:
        charts.append(_img(_loss_chart(loss), "Training loss"))
    columns = ("question", "gold_sql", "pred_sql", "pred_error")
    worst_rows = "".join(
        "<tr>" + "".join(f"<td>{esc(str(record.get(k) or ''))}</td>" for k in columns) + "</tr>"
        for record in worst
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}td{{font-family:monospace}}
img{{max-width:100%}}</style></head><body>
<h1>{esc(title)}</h1>
<table><tr><th>Metric</th>{head}</tr>{"".join(body)}</table>
{"".join(f"<p>{esc(note)}</p>" for note in notes)}
<p>{esc(_DEFINITIONS)}</p>
{"".join(charts)}
<h2>Rows left out ({len(excluded)})</h2>
<ul>{excluded_items}</ul>
<h2>Trivial rows ({len(trivial)})</h2>
<p>{esc(_TRIVIAL_NOTE)}</p>
<ul>{trivial_items}</ul>
<h2>Worst examples ({esc(label or "none")})</h2>
<table><tr><th>Question</th><th>Gold</th><th>Prediction</th><th>Error</th></tr>{worst_rows}</table>
</body></html>
"""


def _bar_chart(metrics_by_model: dict[str, dict], name: str, title: str) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, never touches the global backend

    groups = _groups(metrics_by_model, name)
    figure = Figure(figsize=(8, 3.5), dpi=90)
    axes = figure.subplots()
    width = 0.8 / max(1, len(metrics_by_model))
    for offset, (model, metrics) in enumerate(metrics_by_model.items()):
        stats = [((metrics.get(name) or {}).get(g) or {}) for g in groups]
        values = [s.get("execution_accuracy") or 0.0 for s in stats]
        axes.bar([i + offset * width for i in range(len(groups))], values, width, label=model,
                 yerr=_error_bars([(s.get("execution_accuracy"), (s.get("ci95") or {}).get("execution_accuracy"))
                                   for s in stats]), capsize=2)
    axes.set_xticks([i + width * (len(metrics_by_model) - 1) / 2 for i in range(len(groups))])
    axes.set_xticklabels(groups, rotation=20, ha="right", fontsize=8, parse_math=False)  # "$" in data is text
    axes.set_ylim(0, 1)
    axes.set_ylabel("execution accuracy")
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    figure.tight_layout()
    return _png(figure)


def _error_bars(points: list[tuple[float | None, list[float] | None]]) -> list[list[float]]:
    """matplotlib's yerr (distance below, above) for (value, [low, high]) points; 0 where there is no interval."""
    below = [max(0.0, (v or 0.0) - ci[0]) if ci else 0.0 for v, ci in points]
    above = [max(0.0, ci[1] - (v or 0.0)) if ci else 0.0 for v, ci in points]
    return [below, above]


def _headline_chart(metrics_by_model: dict[str, dict]) -> bytes:
    """Each model's accuracies as bars with 95% bootstrap error bars."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, never touches the global backend

    keys = ("execution_accuracy", "execution_accuracy_single_db", "exact_match", "normalized_match", "valid_sql_rate")
    figure = Figure(figsize=(8, 3.5), dpi=90)
    axes = figure.subplots()
    width = 0.8 / max(1, len(metrics_by_model))
    for offset, (model, metrics) in enumerate(metrics_by_model.items()):
        values = [metrics.get(k) or 0.0 for k in keys]
        axes.bar([i + offset * width for i in range(len(keys))], values, width, label=model,
                 yerr=_error_bars([(metrics.get(k), (metrics.get("ci95") or {}).get(k)) for k in keys]), capsize=3)
    axes.set_xticks([i + width * (len(metrics_by_model) - 1) / 2 for i in range(len(keys))])
    axes.set_xticklabels([_LABELS[k].replace(" (", "\n(") for k in keys], fontsize=7)
    axes.set_ylim(0, 1)
    axes.set_title("Accuracies with 95% bootstrap intervals")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    figure.tight_layout()
    return _png(figure)


def _loss_chart(log: list[dict]) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, never touches the global backend

    figure = Figure(figsize=(8, 3), dpi=90)
    axes = figure.subplots()
    axes.plot([e["step"] for e in log], [e["loss"] for e in log])
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title("Training loss")
    figure.tight_layout()
    return _png(figure)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<h2>{html.escape(alt)}</h2><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">\n'


def _groups(metrics_by_model: dict[str, dict], name: str) -> list[str]:
    groups: dict[str, None] = {}
    for metrics in metrics_by_model.values():
        groups.update(dict.fromkeys(metrics.get(name) or {}))
    return list(groups)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    return str(value) if key in _COUNTS else f"{100 * value:.1f}%"


def _fmt_delta(key: str, base: Any, tuned: Any) -> str:
    if base is None or tuned is None:
        return "–"
    if key in _COUNTS:
        return f"{tuned - base:+d}"
    return f"{100 * (tuned - base):+.1f} pp"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _md_text(value: Any) -> str:
    """Text from the data (ids, questions, group names) as plain Markdown: one line, HTML escaped, and the
    characters that start emphasis, links or code backslash-escaped (`|` is left to `_md_row`)."""
    text = html.escape(" ".join(str(value if value is not None else "").split()), quote=False)
    return re.sub(r"([\\`*_\[\]~])", r"\\\1", text)


def _md_inline(value: Any) -> str:
    return " ".join(str(value or "").split()).replace("`", "'")
