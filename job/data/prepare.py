"""The data stage: load and split rows, tokenize them with the chat template, and report what was kept."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.data.prompts import ChatFormatter
from job.data.sources import DataSplits, load_splits
from job.errors import ConfigError

N_EXAMPLES = 3


@dataclass
class PreparedData:
    splits: DataSplits
    train_features: dict[str, list[list[int]]]
    """`input_ids` and `labels` (-100 outside the answer) of every kept training row."""
    stats: dict[str, Any]
    examples: list[dict[str, Any]]

    def train_dataset(self) -> Any:
        import datasets

        return datasets.Dataset.from_dict(self.train_features)


def _length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
        "total": sum(ordered),
    }


def prepare(cfg: JobConfig, tokenizer: Any) -> PreparedData:
    """Rows -> tokenized training features; rows longer than `training.max_seq_len` are dropped, never cut."""
    splits = load_splits(cfg.data)
    formatter = ChatFormatter(tokenizer)
    max_len = cfg.training.max_seq_len
    features: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    kept_rows, examples = [], []
    lengths: dict[str, dict[str, list[int]]] = {s: {"prompt": [], "answer": [], "total": []} for s in ("train", "eval")}
    for split, rows in (("train", splits.train), ("eval", splits.eval)):
        for row, example in zip(rows, formatter.tokenize_many(rows), strict=True):
            total = len(example.input_ids)
            lengths[split]["prompt"].append(example.prompt_len)
            lengths[split]["answer"].append(total - example.prompt_len)
            lengths[split]["total"].append(total)
            if split == "eval":
                continue
            if total > max_len:
                splits.reports["train"].dropped["too_long"] += 1
                continue
            kept_rows.append(row)
            features["input_ids"].append(example.input_ids)
            features["labels"].append(example.labels)
            if len(examples) < N_EXAMPLES:
                examples.append(
                    {
                        "id": row["id"],
                        "text": tokenizer.decode(example.input_ids),
                        "trained_on": tokenizer.decode([t for t in example.labels if t != -100]),
                        "n_tokens": total,
                    }
                )
    splits.train = kept_rows
    splits.reports["train"].kept = len(kept_rows)
    if not kept_rows:
        shortest = min(lengths["train"]["total"], default=0)
        raise ConfigError(
            f"training.max_seq_len {max_len}: every training row is longer (shortest has {shortest} tokens); raise it"
        )
    stats = {
        "source": cfg.data.source,
        "eval_carved_from_train": splits.eval_carved,
        "max_seq_len": max_len,
        "splits": {name: report.as_dict() for name, report in splits.reports.items()},
        "eval_rows_over_max_seq_len": sum(n > max_len for n in lengths["eval"]["total"]),
        "tokens": {split: {k: _length_stats(v) for k, v in parts.items()} for split, parts in lengths.items()},
        "system_role": formatter.system_role,
        "stop_token_ids": formatter.stop_ids,
    }
    return PreparedData(splits=splits, train_features=features, stats=stats, examples=examples)


def write_prepared(prepared: PreparedData, out_dir: Path) -> None:
    """`stats.json`, `examples.jsonl` (fully rendered rows) and `eval_ids.json` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stats.json").write_text(json.dumps(prepared.stats, indent=2) + "\n")
    with (out_dir / "examples.jsonl").open("w") as fh:
        for example in prepared.examples:
            fh.write(json.dumps(example) + "\n")
    eval_ids = [row["id"] for row in prepared.splits.eval]
    (out_dir / "eval_ids.json").write_text(json.dumps(eval_ids) + "\n")


def summary(prepared: PreparedData) -> str:
    """A few lines for the terminal: counts per split, drops by reason, token lengths."""
    lines = [f"data: {prepared.stats['source']}"]
    for name, report in prepared.stats["splits"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
        lines.append(f"  {name:5s} loaded {report['loaded']:>7}  kept {report['kept']:>7}  dropped: {dropped}")
    for split, parts in prepared.stats["tokens"].items():
        total = parts["total"]
        if total:
            lines.append(
                f"  {split:5s} tokens/row: mean {total['mean']}, p95 {total['p95']}, max {total['max']} "
                f"(max_seq_len {prepared.stats['max_seq_len']})"
            )
    if prepared.examples:
        first = prepared.examples[0]
        lines.append(f"  example {first['id']} trains on: {first['trained_on']!r}")
    return "\n".join(lines)
