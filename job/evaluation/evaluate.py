"""The evaluation stage: generate SQL for held-out rows with the base and/or tuned model, score it, report it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.data.jsonl import BadLine, json_lines
from job.errors import ConfigError, CorruptInputError, JobError, MissingInputError


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for record in records:
            fh.write(json.dumps(record, default=str) + "\n")


def read_predictions(source: str | Path) -> list[dict[str, Any]]:
    """Predictions as JSON lines (a local file or an s3:// object) with at least `id` and `sql`, one per id. A
    missing local file is a usage error (exit 2); an empty file, a bad line or a second prediction for an id is
    a corrupt input (exit 3) naming the line."""
    from job.evaluation.scoring import id_key
    from job.settings import cache_root
    from job.storage import objects as storage

    source = str(source)
    if storage.is_remote(source):
        path = storage.fetch_to_cache(source, cache_root() / "predictions")
    else:
        path = storage.local_path(source)
        if not path.is_file():
            raise ConfigError(f"--predictions {source}: no such file")
    predictions, lines = [], {}
    for number, record in json_lines(path):
        if isinstance(record, BadLine):
            raise CorruptInputError(f"--predictions {source}:{number}: {record.detail}")
        if "id" not in record or not isinstance(record.get("sql", ""), str) or isinstance(record["id"], (dict, list)):
            raise CorruptInputError(f'--predictions {source}:{number}: expected {{"id": ..., "sql": "..."}}')
        key = id_key(record["id"])
        if key in lines:
            raise CorruptInputError(f"--predictions {source}:{number}: a second prediction for id "
                                    f"{record['id']!r} (the first is on line {lines[key]})")
        lines[key] = number
        predictions.append(record)
    if not predictions:
        raise CorruptInputError(f"--predictions {source}: no predictions (the file is empty)")
    return predictions


def scoring_settings(cfg: JobConfig) -> Any:
    """The `evaluation.*` fields as `ScoringSettings` (sandbox limits, test suite, seed, fixed now, workers)."""
    from job.evaluation.sandbox import Limits
    from job.evaluation.scoring import ScoringSettings

    e = cfg.evaluation
    return ScoringSettings(
        limits=Limits(timeout_s=e.sql_timeout_s, max_rows=e.max_result_rows, fixed_now=e.fixed_now),
        test_suite_size=e.test_suite_size, suite_candidates=e.suite_candidates, seed=e.seed, workers=e.workers,
        top_domains=e.top_domains,
    )


def read_rows(source: str) -> list[dict[str, Any]]:
    """Every valid row of a dataset file/folder/URI (all its splits, in order), for `--rows`: no split needed; a
    broken line fails (strict)."""
    from job.data.sources import SplitReport, check_source, load_source, validate_rows
    from job.storage.objects import check_input

    check_input(source, "--rows")
    check_source(source)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for split in load_source(source, strict=True, option="--rows").values():  # a dropped line would shrink it
        for row in validate_rows(split, SplitReport()):
            if str(row["id"]) not in seen:
                seen.add(str(row["id"]))
                rows.append(row)
    if not rows:
        raise ConfigError(f"--rows {source}: no usable rows")
    return rows


def score_file(
    cfg: JobConfig, predictions_source: str | Path, rows_source: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-row records) of a predictions file (local or s3://) scored against the rows it names: of
    `rows_source` when given, else of `data.source`."""
    from job.data.sources import SplitReport, load_source, validate_rows
    from job.evaluation.scoring import score_models

    predictions = read_predictions(predictions_source)
    by_id: dict[str, dict[str, Any]] = {}
    if rows_source:
        by_id = {_key(row["id"]): row for row in read_rows(rows_source)}
    else:
        splits = load_source(cfg.data.source, strict=cfg.data.strict)
        for name in sorted(splits, key=lambda n: n != cfg.data.eval_split):  # the eval split wins on shared ids
            for row in validate_rows(splits[name], SplitReport()):
                by_id.setdefault(_key(row["id"]), row)
    unknown = [p["id"] for p in predictions if _key(p["id"]) not in by_id]
    if unknown:
        where = rows_source or cfg.data.source
        raise ConfigError(f"--predictions: {len(unknown)} ids not in {where} (first: {unknown[0]!r})")
    rows = [by_id[_key(p["id"])] for p in predictions]
    return score_models(rows, {"predictions": predictions}, scoring_settings(cfg))["predictions"]


def write_scored(out_dir: Path, metrics: dict[str, Any], per_row: list[dict[str, Any]]) -> dict[str, Any]:
    """`metrics.json` and `scored.jsonl` of a `score_file` into `out_dir`; returns the metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_jsonl(out_dir / "scored.jsonl", per_row)
    return metrics


def run_rows(
    run_uri: str, overrides: tuple[str, ...] | list[str] = ()
) -> tuple[JobConfig, list[dict[str, Any]], list[dict[str, Any]]]:
    """(the run's config, its evaluation rows in recorded order, its training rows) for `evaluate --run`.

    The evaluation rows are exactly `data/eval_ids.json` of the run; the training rows are the run's train split
    recomputed from its saved config (deterministic), which the adapter may have seen. `overrides` (--set) apply
    on top of the saved config.
    """
    from job.config import load_config
    from job.data.sources import load_splits
    from job.settings import CONFIG_FILE
    from job.storage import objects as storage

    base = run_uri.rstrip("/")
    try:
        eval_ids = json.loads(storage.read_text(storage.join(base, "data", "eval_ids.json")))
        config_text = storage.read_text(storage.join(base, CONFIG_FILE))
    except storage.NotFound as exc:
        raise MissingInputError(f"--run {run_uri}: not a run folder ({exc})") from None
    except json.JSONDecodeError:
        raise ConfigError(f"--run {run_uri}: data/eval_ids.json is not JSON") from None
    if not isinstance(eval_ids, list) or not eval_ids:
        raise ConfigError(f"--run {run_uri}: data/eval_ids.json holds no ids")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / CONFIG_FILE
        config_path.write_text(config_text)
        cfg = load_config(str(config_path), list(overrides), environ={})
    splits = load_splits(cfg.data)
    by_id = {_key(row["id"]): row for row in [*splits.eval, *splits.train]}
    missing = [i for i in eval_ids if _key(i) not in by_id]
    if missing:
        raise MissingInputError(
            f"--run {run_uri}: {len(missing)} recorded eval ids are not in {cfg.data.source} (first: {missing[0]!r})"
        )
    return cfg, [by_id[_key(i)] for i in eval_ids], splits.train


def refuse_trained_rows(rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], where: str) -> None:
    """A one-line usage error when any row to evaluate is one the adapter trained on (same id or question+schema)."""
    trained_ids = {_key(r["id"]) for r in train_rows}
    trained_content = {_content(r) for r in train_rows}
    leaked = [r["id"] for r in rows if _key(r["id"]) in trained_ids or _content(r) in trained_content]
    if leaked:
        raise ConfigError(
            f"{where}: {len(leaked)} of {len(rows)} rows to evaluate are in the run's training split "
            f"(first id: {leaked[0]!r}); evaluating on them would leak; pass rows the adapter never saw"
        )


def _key(value: object) -> str:
    from job.evaluation.scoring import id_key

    return id_key(value)


def _content(row: dict[str, Any]) -> tuple[str, str]:
    return (" ".join(str(row.get("sql_prompt", "")).lower().split()),
            " ".join(str(row.get("sql_context", "")).lower().split()))


def _local_adapter(adapter: str) -> str:
    if adapter.startswith("s3://"):
        from job.settings import cache_root
        from job.storage.objects import fetch_to_cache

        return str(fetch_to_cache(adapter, cache_root() / "adapters"))
    path = Path(adapter.removeprefix("file://")).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter}: not a peft adapter folder (no adapter_config.json)")
    return str(path)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """The model in eval mode for generation; its previous train/eval mode afterwards."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _generate(
    cfg: JobConfig, model: Any, tokenizer: Any, rows: list[dict[str, Any]], label: str
) -> list[dict] | None:
    """Predictions in row order; under several processes each generates its share and only rank 0 gets them all
    (elsewhere None)."""
    from job.evaluation.generate import generate_predictions
    from job.evaluation.sharding import generate_sharded

    return generate_sharded(
        lambda share: generate_predictions(
            model, tokenizer, share, batch_size=cfg.evaluation.batch_size,
            max_new_tokens=cfg.evaluation.max_new_tokens, label=label,
        ), rows, tokenizer, cfg.evaluation.batch_size,
    )


def evaluate_models(
    cfg: JobConfig,
    out_dir: Path,
    *,
    adapter: str | Path | None = None,
    compare_base: bool,
    rows: list[dict[str, Any]] | None = None,
    train_log: list[dict[str, Any]] | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate the base model (when there is no adapter, or `compare_base`) and the tuned one, on the same rows.

    With `model` (an in-memory peft model, e.g. just trained) and `tokenizer`, nothing is loaded: "tuned" is
    that model and "base" the same weights inside peft's `disable_adapter()` (LoRA and prompt tuning alike).
    Otherwise the base is loaded from `cfg.model` and `adapter` (folder or s3://) on top of it.

    Writes `<out_dir>/<base|tuned>/{predictions,scored}.jsonl` and `metrics.json`, then `metrics.json`,
    `report.md` and `report.html` side by side. Returns the metrics by model label.
    """
    from job.data.sources import load_splits

    if (model is None) != (tokenizer is None):
        raise ValueError("evaluate_models: pass both `model` and `tokenizer`, or neither")
    rows = rows if rows is not None else load_splits(cfg.data).eval
    predictions: dict[str, list[dict[str, Any]]] = {}
    if model is not None:
        with _eval_mode(model):
            if compare_base:
                with model.disable_adapter():
                    predictions["base"] = _generate(cfg, model, tokenizer, rows, "base")
            predictions["tuned"] = _generate(cfg, model, tokenizer, rows, "tuned")
    else:
        predictions = _generate_from_disk(cfg, rows, adapter, compare_base)
    if any(records is None for records in predictions.values()):
        return {}  # not rank 0: rank 0 scores, writes and reports
    for label, records in predictions.items():
        _write_jsonl(out_dir / label / "predictions.jsonl", records)
    return score_and_report(cfg, out_dir, rows, predictions, train_log=train_log)


def _generate_from_disk(
    cfg: JobConfig, rows: list[dict[str, Any]], adapter: str | Path | None, compare_base: bool
) -> dict[str, list[dict[str, Any]]]:
    from job.train.model import load_base_model, load_tokenizer, resolve_model_path

    adapter_path = _local_adapter(str(adapter)) if adapter else None
    model_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, adapter_path or model_path)
    model = load_base_model(cfg.model, model_path)
    predictions = {}
    if adapter_path is None or compare_base:
        predictions["base"] = _generate(cfg, model, tokenizer, rows, "base")
    if adapter_path is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter_path)
        except (OSError, ValueError) as exc:
            raise JobError(f"--adapter {adapter}: cannot load on {cfg.model.name}: {exc}") from None
        predictions["tuned"] = _generate(cfg, model, tokenizer, rows, "tuned")
    return predictions


def score_and_report(
    cfg: JobConfig,
    out_dir: Path,
    rows: list[dict[str, Any]],
    predictions: dict[str, list[dict[str, Any]]],
    train_log: list[dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every model's predictions in one pass (each row's suite built once), write per-model files and reports."""
    from job.evaluation.report import write_reports
    from job.evaluation.scoring import score_models

    results = score_models(rows, predictions, scoring_settings(cfg))
    metrics = {label: result[0] for label, result in results.items()}
    scored = {label: result[1] for label, result in results.items()}
    # The reports add the paired tuned-vs-base test to the tuned metrics (`vs_base`): write each model's files after.
    write_reports(out_dir, metrics, scored, train_log=train_log, title=f"Text-to-SQL evaluation: {cfg.model.name}")
    for label in results:
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        (out_dir / label / "metrics.json").write_text(json.dumps(metrics[label], indent=2) + "\n")
        _write_jsonl(out_dir / label / "scored.jsonl", scored[label])
    return metrics
