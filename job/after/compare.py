"""`finetune compare`: runs side by side, read from each run's manifest (and its training log), local or s3://."""

from __future__ import annotations

import json
from typing import Any

from job.errors import MissingInputError
from job.settings import MANIFEST
from job.storage import objects as storage
from job.storage.publish import read_checked_manifest

TRAIN_LOG = "logs/train_log.jsonl"
IGNORED_CONFIG = {"output.uri", "output.run_id", "training.checkpoint_uri"}
"""Where a run was written is not a difference between runs."""
MISSING = "-"


def load_run(uri: str) -> dict[str, Any]:
    """A run's manifest and training log; one-line errors when the run is missing or not finished."""
    uri = uri.rstrip("/") or uri
    manifest = read_checked_manifest(storage.join(uri, MANIFEST))
    if manifest is None:
        raise MissingInputError(f"{uri}: no {MANIFEST} (not a run, or not finished/published yet)")
    log: list[dict[str, Any]] = []
    if any(f["path"] == TRAIN_LOG for f in manifest["files"]):
        log = _log_entries(storage.read_text(storage.join(uri, TRAIN_LOG)))
    return {"uri": uri, "manifest": manifest, "train_log": log}


def _log_entries(text: str) -> list[dict[str, Any]]:
    """The training log's entries; a line that is not a JSON object (a log cut short) is left out."""
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for section, fields in (config or {}).items():
        if isinstance(fields, dict):
            flat.update({f"{section}.{key}": value for key, value in fields.items()})
        else:
            flat[section] = fields
    return flat


def config_differences(runs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Config keys whose values are not the same in every run, with each run's value."""
    flats = [_flatten(run["manifest"].get("config") or {}) for run in runs]
    keys = sorted(set().union(*flats) - IGNORED_CONFIG)
    return {key: [flat.get(key, MISSING) for flat in flats] for key in keys
            if len({json.dumps(flat.get(key, MISSING), sort_keys=True) for flat in flats}) > 1}


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else MISSING


def accuracy_cell(metrics: dict[str, Any], key: str) -> str:
    """`42.0% [38.1%, 46.0%]`: the accuracy and its 95% interval when the metrics carry one."""
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return MISSING
    interval = (metrics.get("ci95") or {}).get(key)  # as job.evaluation.scoring writes it
    numbers = isinstance(interval, (list, tuple)) and all(isinstance(v, (int, float)) for v in interval)
    if numbers and len(interval) == 2:
        return f"{value:.1%} [{interval[0]:.1%}, {interval[1]:.1%}]"
    return _percent(value)


def training_cells(run: dict[str, Any]) -> dict[str, str]:
    log = run["train_log"]
    if not log:
        return {"steps": MISSING, "train time": MISSING, "tokens/s": MISSING}
    last = log[-1]
    rates = [e["tokens_per_s"] for e in log if isinstance(e.get("tokens_per_s"), (int, float))]
    elapsed = last.get("elapsed_s")
    return {
        "steps": str(last.get("step", MISSING)),
        "train time": f"{elapsed / 60:.1f} min" if isinstance(elapsed, (int, float)) else MISSING,
        "tokens/s": f"{sum(rates) / len(rates):.0f}" if rates else MISSING,
    }


def comparison_rows(runs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) rows: identity, config differences, training, accuracy with intervals."""
    manifests = [run["manifest"] for run in runs]
    tuned = [_mapping(_mapping(m.get("metrics")).get("tuned")) for m in manifests]
    base = [_mapping(_mapping(m.get("metrics")).get("base")) for m in manifests]
    rows: list[tuple[str, list[str]]] = [
        ("status", [str(m.get("status") or MISSING) for m in manifests]),
        ("ended", [str(m.get("ended_at") or MISSING) for m in manifests]),
    ]
    rows += [(key, [json.dumps(v) if not isinstance(v, str) else v for v in values])
             for key, values in config_differences(runs).items()]
    cells = [training_cells(run) for run in runs]
    rows += [(label, [c[label] for c in cells]) for label in ("steps", "train time", "tokens/s")]
    rows += [
        ("test-suite accuracy (tuned)", [accuracy_cell(m, "execution_accuracy") for m in tuned]),
        ("single-db accuracy (tuned)", [accuracy_cell(m, "execution_accuracy_single_db") for m in tuned]),
        ("test-suite accuracy (base)", [accuracy_cell(m, "execution_accuracy") for m in base]),
        ("valid SQL (tuned)", [_percent(m.get("valid_sql_rate")) for m in tuned]),
        ("scored rows (tuned)", [str(m.get("n_scored", MISSING)) for m in tuned]),
    ]
    return rows


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def markdown_table(runs: list[dict[str, Any]]) -> str:
    names = [str(run["manifest"].get("run_id") or run["uri"].rsplit("/", 1)[-1]) for run in runs]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, cells in comparison_rows(runs):
        lines.append(f"| {label} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
