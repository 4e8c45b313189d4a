"""Evaluation reports: `metrics.json`, `report.md` and a self-contained `report.html` (charts inline)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from job.evaluation.scoring import HEADLINE_METRICS, compare_metrics

_LABELS = {
    "execution_accuracy": "Execution accuracy",
    "exact_match": "Exact match",
    "normalized_match": "Normalized match",
    "valid_sql_rate": "Valid SQL",
    "empty_rate": "Empty output",
    "runaway_rate": "Runaway (no stop)",
}
_COUNTS = ("n_rows", "n_gold_failed", "n_scored")
_DEFINITIONS = (
    "Execution accuracy is over scored rows (gold SQL runs on its own context in SQLite); every other "
    "rate is over all rows, except runaway, which is over rows with generation info. `n_gold_failed` rows "
    "(context or gold SQL fails in SQLite) are excluded from execution accuracy only."
)
_WORST_LIMIT = 10


def write_reports(
    eval_dir: Path,
    metrics_by_model: dict[str, dict],
    rows_by_model: dict[str, list[dict]],
    train_log: list[dict] | None = None,
    title: str = "Text-to-SQL evaluation",
) -> None:
    """Write `metrics.json`, `report.md` and `report.html` for one or more models (e.g. "base", "tuned")."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = dict(metrics_by_model)
    if "base" in metrics_by_model and "tuned" in metrics_by_model:
        summary["delta"] = compare_metrics(metrics_by_model["base"], metrics_by_model["tuned"])
    (eval_dir / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    worst_label, worst = worst_examples(metrics_by_model, rows_by_model)
    (eval_dir / "report.md").write_text(_markdown(title, metrics_by_model, worst_label, worst))
    (eval_dir / "report.html").write_text(_html(title, metrics_by_model, worst_label, worst, train_log))


def headline_line(label: str, m: dict[str, Any]) -> str:
    """One terminal line with a model's headline numbers."""
    runaway = f", runaway {m['runaway_rate']:.1%}" if m.get("runaway_rate") is not None else ""
    return (
        f"{label}: execution accuracy {m['execution_accuracy']:.1%} of {m['n_scored']} scored rows "
        f"({m['n_gold_failed']} with failing gold left out), exact {m['exact_match']:.1%}, "
        f"valid SQL {m['valid_sql_rate']:.1%}{runaway}"
    )


def headline_markdown(metrics_by_model: dict[str, dict]) -> str:
    """Headline metrics as markdown: one column per model, plus Δ (tuned - base) when both exist."""
    models = list(metrics_by_model)
    with_delta = "base" in metrics_by_model and "tuned" in metrics_by_model
    header = ["Metric", *models, *(["Δ (tuned - base)"] if with_delta else [])]
    lines = [_md_row(header), _md_row(["---"] + ["---:"] * (len(header) - 1))]
    for key in (*HEADLINE_METRICS, *_COUNTS):
        values = [metrics_by_model[m].get(key) for m in models]
        if key == "runaway_rate" and all(v is None for v in values):
            continue
        cells = [_fmt(key, v) for v in values]
        if with_delta:
            base, tuned = metrics_by_model["base"].get(key), metrics_by_model["tuned"].get(key)
            cells.append(_fmt_delta(key, base, tuned))
        lines.append(_md_row([_LABELS.get(key, key), *cells]))
    return "\n".join(lines) + "\n"


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


def _markdown(title: str, metrics_by_model: dict[str, dict], label: str | None, worst: list[dict]) -> str:
    parts = [f"# {title}\n", headline_markdown(metrics_by_model), f"{_DEFINITIONS}\n"]
    failed = {m: metrics.get("n_gold_failed") for m, metrics in metrics_by_model.items()}
    parts.append(
        "Rows whose gold SQL does not run in SQLite (other dialects, `CREATE SCHEMA`, ambiguous columns): "
        + ", ".join(f"{m}: {n}" for m, n in failed.items())
        + ". They are listed with `gold_error` in the per-row records.\n"
    )
    sections = (("by_complexity", "SQL complexity"), ("by_task_type", "task type"), ("by_domain", "domain"))
    for name, heading in sections:
        parts.append(f"## Execution accuracy by {heading}\n")
        parts.append(_breakdown_markdown(metrics_by_model, name, heading))
    parts.append(f"## Worst examples ({label or 'none'})\n")
    if not worst:
        parts.append("No misses.\n")
    for record in worst:
        parts.append(
            f"- **{html.escape(_md_inline(record.get('question')), quote=False)}** "
            f"(id {record.get('id')}, {record.get('sql_complexity')})\n"
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
            f"{_fmt('execution_accuracy', a)} (n={s.get('n_scored', 0)})"
            for a, s in zip(accuracy, stats, strict=True)
        ]
        if with_delta:
            cells.append(_fmt_delta("execution_accuracy", accuracy[models.index("base")],
                                    accuracy[models.index("tuned")]))
        lines.append(_md_row([group, str(n_rows), *cells]))
    return "\n".join(lines) + "\n"


def _html(
    title: str,
    metrics_by_model: dict[str, dict],
    label: str | None,
    worst: list[dict],
    train_log: list[dict] | None,
) -> str:
    esc = html.escape
    models = list(metrics_by_model)
    with_delta = "base" in metrics_by_model and "tuned" in metrics_by_model
    head = "".join(f"<th>{esc(m)}</th>" for m in models) + ("<th>Δ (tuned - base)</th>" if with_delta else "")
    body = []
    for key in (*HEADLINE_METRICS, *_COUNTS):
        values = [metrics_by_model[m].get(key) for m in models]
        if key == "runaway_rate" and all(v is None for v in values):
            continue
        cells = "".join(f"<td>{esc(_fmt(key, v))}</td>" for v in values)
        if with_delta:
            delta = _fmt_delta(key, metrics_by_model["base"].get(key), metrics_by_model["tuned"].get(key))
            cells += f"<td>{esc(delta)}</td>"
        body.append(f"<tr><th>{esc(_LABELS.get(key, key))}</th>{cells}</tr>")
    charts = [
        _img(_bar_chart(metrics_by_model, "by_complexity", "Execution accuracy by SQL complexity"),
             "Execution accuracy by SQL complexity"),
        _img(_bar_chart(metrics_by_model, "by_task_type", "Execution accuracy by task type"),
             "Execution accuracy by task type"),
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
<p>{esc(_DEFINITIONS)}</p>
{"".join(charts)}
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
        values = [((metrics.get(name) or {}).get(g) or {}).get("execution_accuracy") or 0.0 for g in groups]
        axes.bar([i + offset * width for i in range(len(groups))], values, width, label=model)
    axes.set_xticks([i + width * (len(metrics_by_model) - 1) / 2 for i in range(len(groups))])
    axes.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("execution accuracy")
    axes.set_title(title)
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


def _md_inline(value: Any) -> str:
    return " ".join(str(value or "").split()).replace("`", "'")
