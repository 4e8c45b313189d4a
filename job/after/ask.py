"""`finetune ask`: answer questions about a schema with a run's model, through the evaluation's own generation
(same chat template, instruction, greedy decoding and stop tokens), optionally executing the SQL in the sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from job.after.source import RunSource
from job.data.jsonl import read_records
from job.errors import ConfigError, CorruptInputError, JobError


def read_questions(path: Path) -> list[dict[str, Any]]:
    """JSON lines, each {"question": "...", optional "id" and "schema" (schema text for that question)}."""
    if not path.is_file():
        raise ConfigError(f"--file {path}: no such file")
    questions = read_records(
        path, "--file", lambda r: isinstance(r.get("question"), str) and bool(r["question"]) and isinstance(
            r.get("schema", ""), (str, type(None))), '{"question": "...", optional "schema": "..."}',
    )
    if not questions:
        raise CorruptInputError(f"--file {path}: no questions (the file is empty)")
    return questions


def as_rows(schema: str, questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dataset-shaped rows, so the evaluation's ChatFormatter renders them exactly like held-out rows."""
    return [
        {"id": q.get("id", i), "sql_context": q.get("schema") or schema, "sql_prompt": q["question"], "sql": ""}
        for i, q in enumerate(questions)
    ]


def load_model(source: RunSource) -> tuple[Any, Any]:
    """The run's base, loaded as the run trained and evaluated it, with its adapter; and the adapter's tokenizer."""
    from peft import PeftModel

    from job.train.model import load_base_model, load_tokenizer, resolve_model_path

    model_cfg = source.model_config()
    path = resolve_model_path(model_cfg.name)
    tokenizer = load_tokenizer(model_cfg, source.tokenizer_path(path))
    try:
        model = PeftModel.from_pretrained(load_base_model(model_cfg, path), str(source.adapter_dir))
    except (OSError, ValueError) as exc:
        raise JobError(f"--run {source.uri}: cannot load its adapter on {model_cfg.name}: {exc}") from None
    return model, tokenizer


def answer(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, execute: bool, max_new_tokens: int, batch_size: int,
    timeout_s: float = 2.0, max_rows: int = 10_000,
) -> list[dict[str, Any]]:
    """One record per row: id, question, sql, stopped; with `execute`, columns/rows or error from the sandbox."""
    from job.evaluation.generate import generate_predictions

    predictions = generate_predictions(
        model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens, label="ask"
    )
    answers = []
    for row, prediction in zip(rows, predictions, strict=True):
        record = {"id": row["id"], "question": row["sql_prompt"], "sql": prediction["sql"],
                  "stopped": prediction["stopped"]}
        if execute:
            record.update(run_in_sandbox(row["sql_context"], prediction["sql"], timeout_s, max_rows))
        answers.append(record)
    return answers


def run_in_sandbox(schema: str, sql: str, timeout_s: float, max_rows: int) -> dict[str, Any]:
    """Build the schema's database in memory (hardened sandbox) and run the SQL on a fresh copy of it."""
    from job.evaluation.sandbox import Limits, build_context

    context = build_context(schema, Limits(timeout_s=timeout_s, max_rows=max_rows))
    try:
        if context.error:
            return {"error": f"schema: {context.error}"}
        if not sql.strip():
            return {"error": "no SQL in the answer"}
        with context.fresh() as db:
            result = db.run_query(sql)
    finally:
        context.close()
    if not result.ok:
        return {"error": result.error}
    if result.rows is None:
        return {"columns": [], "rows": [], "note": "the statement returned no result set"}
    return {"columns": result.columns, "rows": [list(r) for r in result.rows]}


def format_table(columns: list[str], rows: list[list[Any]], limit: int = 50) -> str:
    """A plain-text table of a result set (first `limit` rows)."""
    cells = [[("NULL" if v is None else str(v)) for v in row] for row in rows[:limit]]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    more = f"\n({len(rows)} rows, first {limit} shown)" if len(rows) > limit else f"\n({len(rows)} rows)"
    return "\n".join(lines) + more
