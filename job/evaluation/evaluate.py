"""The evaluation stage: generate SQL for held-out rows with the base and/or tuned model, score it, report it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.errors import ConfigError, JobError


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for record in records:
            fh.write(json.dumps(record, default=str) + "\n")


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Predictions as JSON lines with at least `id` and `sql`; a bad line is a one-line usage error."""
    if not path.is_file():
        raise ConfigError(f"--predictions {path}: no such file")
    predictions = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--predictions {path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("sql", ""), str):
            raise ConfigError(f'--predictions {path}:{number}: expected {{"id": ..., "sql": "..."}}')
        predictions.append(record)
    return predictions


def _score(cfg: JobConfig, rows: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> tuple[dict, list]:
    from job.evaluation.scoring import score_predictions

    e = cfg.evaluation
    return score_predictions(
        rows, predictions, timeout_s=e.sql_timeout_s, max_result_rows=e.max_result_rows, top_domains=e.top_domains
    )


def score_file(cfg: JobConfig, predictions_path: Path, output: Path | None) -> dict[str, Any]:
    """Score a predictions file against the rows of `data.source` that the predictions name."""
    from job.data.sources import SplitReport, load_source, validate_rows

    predictions = read_predictions(predictions_path)
    splits = load_source(cfg.data.source)
    by_id: dict[str, dict[str, Any]] = {}
    for name in sorted(splits, key=lambda n: n != cfg.data.eval_split):  # the eval split wins on shared ids
        for row in validate_rows(splits[name], SplitReport()):
            by_id.setdefault(str(row["id"]), row)
    unknown = [p["id"] for p in predictions if str(p["id"]) not in by_id]
    if unknown:
        raise ConfigError(f"--predictions: {len(unknown)} ids not in {cfg.data.source} (first: {unknown[0]!r})")
    rows = [by_id[str(p["id"])] for p in predictions]
    metrics, per_row = _score(cfg, rows, predictions)
    if output:
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _write_jsonl(output / "scored.jsonl", per_row)
    return metrics


def _evaluate_model(
    cfg: JobConfig, model: Any, tokenizer: Any, rows: list[dict[str, Any]], out_dir: Path, label: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from job.evaluation.generate import generate_predictions
    from job.evaluation.sharding import generate_sharded

    predictions = generate_sharded(  # several processes: each generates for its share, rank 0 gets them all
        lambda share: generate_predictions(
            model, tokenizer, share, batch_size=cfg.evaluation.batch_size,
            max_new_tokens=cfg.evaluation.max_new_tokens, label=label,
        ), rows, tokenizer, cfg.evaluation.batch_size,
    )
    if predictions is None:
        return {}, []  # not rank 0: rank 0 scores and writes
    _write_jsonl(out_dir / label / "predictions.jsonl", predictions)
    metrics, per_row = _score(cfg, rows, predictions)
    (out_dir / label / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_jsonl(out_dir / label / "scored.jsonl", per_row)
    return metrics, per_row


def _local_adapter(adapter: str) -> str:
    if adapter.startswith("s3://"):
        from job.settings import cache_root
        from job.storage.objects import fetch_to_cache

        return str(fetch_to_cache(adapter, cache_root() / "adapters"))
    path = Path(adapter.removeprefix("file://")).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter}: not a peft adapter folder (no adapter_config.json)")
    return str(path)


def evaluate_models(
    cfg: JobConfig,
    out_dir: Path,
    *,
    adapter: str | Path | None,
    compare_base: bool,
    rows: list[dict[str, Any]] | None = None,
    train_log: list[dict[str, Any]] | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate the base model (when `adapter` is None or `compare_base`) and the adapter, on the same rows.

    Writes `<out_dir>/<base|tuned>/{predictions,scored}.jsonl` and `metrics.json`, then `metrics.json`,
    `report.md` and `report.html` side by side. Returns the metrics by model label.
    """
    from job.data.sources import load_splits
    from job.evaluation.report import write_reports
    from job.train.distributed import is_main
    from job.train.model import load_base_model, load_tokenizer, resolve_model_path

    rows = rows if rows is not None else load_splits(cfg.data).eval
    if model is not None:  # TEMP (superseded by wip-eval): the trained peft model in memory, base = adapter off
        metrics, scored = {}, {}
        if compare_base:
            with model.disable_adapter():
                metrics["base"], scored["base"] = _evaluate_model(cfg, model, tokenizer, rows, out_dir, "base")
        metrics["tuned"], scored["tuned"] = _evaluate_model(cfg, model, tokenizer, rows, out_dir, "tuned")
        if is_main():
            title = f"Text-to-SQL evaluation: {cfg.model.name}"
            write_reports(out_dir, metrics, scored, train_log=train_log, title=title)
        return metrics
    adapter_path = _local_adapter(str(adapter)) if adapter else None
    model_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, adapter_path or model_path)
    model = load_base_model(cfg.model, model_path)
    metrics: dict[str, dict[str, Any]] = {}
    scored: dict[str, list[dict[str, Any]]] = {}
    if adapter_path is None or compare_base:
        metrics["base"], scored["base"] = _evaluate_model(cfg, model, tokenizer, rows, out_dir, "base")
    if adapter_path is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter_path)
        except (OSError, ValueError) as exc:
            raise JobError(f"--adapter {adapter}: cannot load on {cfg.model.name}: {exc}") from None
        metrics["tuned"], scored["tuned"] = _evaluate_model(cfg, model, tokenizer, rows, out_dir, "tuned")
    write_reports(out_dir, metrics, scored, train_log=train_log, title=f"Text-to-SQL evaluation: {cfg.model.name}")
    return metrics
