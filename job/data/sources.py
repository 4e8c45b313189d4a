"""Load text-to-SQL rows (Hub, local files or s3://), validate them, and split them deterministically."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config import DataConfig
from job.data.jsonl import BadLine, checked_object, json_lines
from job.errors import ConfigError, CorruptInputError, MissingInputError
from job.settings import cache_root

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("sql_prompt", "sql_context", "sql")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class SplitReport:
    """Row counts of one split: loaded from the source, kept, and dropped by reason."""

    loaded: int = 0
    """Rows that reached this split; always loaded == kept + sum(dropped)."""
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


@dataclass
class DataSplits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    reports: dict[str, SplitReport]
    eval_carved: bool
    """True when the source had a single split and the evaluation rows were held out of it."""


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~", "file://")) or Path(source).suffix.lower() in FILE_FORMATS


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_FORMATS)
        if not files:
            raise ConfigError(f"data.source {path}: no .jsonl/.json/.parquet/.csv files in the folder")
    formats = {FILE_FORMATS.get(p.suffix.lower()) for p in files}
    if None in formats or len(formats) != 1:
        raise ConfigError(f"data.source {path}: expected files of one format among {', '.join(FILE_FORMATS)}")
    return formats.pop(), [str(p) for p in files]


def _split_files(files: list[str]) -> dict[str, list[str]]:
    """Files named like `*train*` / `*test*` / `*valid*` form those splits; anything else is one `train` split."""
    splits: dict[str, list[str]] = {}
    for name in files:
        stem = Path(name).stem.lower()
        split = next((s for s in ("test", "validation", "valid", "train") if s in stem), "train")
        splits.setdefault(split, []).append(name)
    return splits


def check_source(source: str) -> None:
    """Fail fast, before any model is loaded, on a local data source that does not exist."""
    local = not source.startswith("s3://") and _looks_like_path(source)
    if local and not Path(source.removeprefix("file://")).expanduser().exists():
        raise ConfigError(f"data.source {source}: no such file or folder")


class Rows(list):
    """A split's rows read from JSON files, with the lines that could not be rows counted by reason (`broken`)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: Counter = Counter()


def load_source(source: str, *, strict: bool = False, option: str = "data.source") -> dict[str, Any]:
    """Split name -> rows (`datasets.Dataset`, or `Rows` for JSON files), from a Hub dataset id, local file(s) or
    an s3:// object or prefix (fetched once into `<cache root>/data`).

    A JSON line that is not UTF-8, not JSON or not an object is dropped and counted by reason (see
    `validate_rows`), or with `strict` fails the load naming file, line and cause; an empty file always fails.
    Unreadable files are CorruptInputError (exit 3); messages start with `option`."""
    import datasets

    check_source(source)
    if source.startswith("s3://"):
        from job.storage.objects import fetch_to_cache

        source = str(fetch_to_cache(source, cache_root() / "data"))
    path = Path(source.removeprefix("file://")).expanduser()
    if path.exists():
        file_format, files = _local_files(path)
        for name in files:
            if _is_empty(Path(name)):
                raise CorruptInputError(f"{option} {name}: empty file (no rows)")
        if file_format == "json":
            return {split: _json_rows(names, strict, option) for split, names in _split_files(files).items()}
        if file_format == "csv":
            for name in files:
                _check_utf8(Path(name), option)
        try:
            loaded = datasets.load_dataset(file_format, data_files=_split_files(files))
        except Exception as exc:
            raise CorruptInputError(f"{option} {source}: cannot read as {file_format}: {_first_line(exc)}") from None
        return dict(loaded)
    try:
        return dict(datasets.load_dataset(source))
    except Exception as exc:
        raise MissingInputError(f"data.source {source}: cannot load the Hub dataset: {_first_line(exc)}") from None


def _check_utf8(path: Path, option: str) -> None:
    """A text file is UTF-8 throughout, else CorruptInputError naming its line and byte (read in blocks)."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with path.open("rb") as handle:
        while True:
            block = handle.read(1 << 20)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:  # exc.object: this block, after bytes held over from the last one
                where = line + exc.object.count(b"\n", 0, exc.start)
                raise CorruptInputError(
                    f"{option} {path}:{where}: not UTF-8 (byte 0x{exc.object[exc.start]:02x})") from None
            if not block:
                return
            line += block.count(b"\n")


def _is_empty(path: Path) -> bool:
    """Nothing but whitespace (and a BOM) in the file."""
    if path.stat().st_size > 65536:
        return False
    return not path.read_bytes().strip(b" \t\r\n\xef\xbb\xbf")


def _json_rows(files: list[str], strict: bool, option: str) -> Rows:
    """The rows of JSON-lines files (or `.json` files holding one array of objects), in order."""
    rows = Rows()
    for name in files:
        path = Path(name)
        for number, record in _json_records(path, option):
            if isinstance(record, BadLine):
                if strict:
                    raise CorruptInputError(f"{option} {path}:{number}: {record.detail}")
                if not rows.broken:
                    logger.warning("%s %s:%d: %s; dropping such lines (set data.strict=true to stop instead)",
                                   option, path, number, record.detail)
                rows.broken[record.reason] += 1
            else:
                rows.append(record)
    if rows.broken:
        logger.warning("%s: dropped %d broken lines (%s)", option, sum(rows.broken.values()),
                       ", ".join(f"{reason} {n}" for reason, n in sorted(rows.broken.items())))
    return rows


def _json_records(path: Path, option: str) -> Iterator[tuple[int, Any]]:
    """(line, record or BadLine): JSON lines, or the elements of a `.json` file whose text is one array."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.suffix.lower() != ".json" or not head.startswith(b"["):
        yield from json_lines(path)
        return
    from job.storage.objects import decode_utf8

    text = decode_utf8(path.read_bytes(), f"{option} {path}").lstrip("\ufeff")
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise CorruptInputError(f"{option} {path}{where}: not JSON ({getattr(exc, 'msg', 'nested too deeply')})"
                                ) from None
    if not isinstance(document, list):
        raise CorruptInputError(f"{option} {path}: expected an array of row objects or JSON lines")
    for index, element in enumerate(document, start=1):  # "line" numbers are element numbers here
        yield index, checked_object(index, element, "\\u" in text)


def _first_line(exc: BaseException) -> str:
    """The root cause's type and first line (datasets wraps what went wrong in a generic error)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _row_id(row: dict[str, Any]) -> str | int:
    if row.get("id") is not None and str(row["id"]).strip():
        return row["id"]
    digest = hashlib.sha1(f"{row['sql_prompt']}\x00{row['sql_context']}".encode()).hexdigest()
    return f"row-{digest[:12]}"


def _content_key(row: dict[str, Any]) -> tuple[str, str]:
    return (" ".join(row["sql_prompt"].lower().split()), " ".join(row["sql_context"].lower().split()))


def _problem(row: dict[str, Any]) -> str | None:
    for name in REQUIRED_FIELDS:
        value = row.get(name)
        if value is None:
            return f"missing_{name}"
        if not isinstance(value, str):
            return f"malformed_{name}"
        if not value.strip():
            return f"empty_{name}"
    return None


def validate_rows(dataset: Any, report: SplitReport) -> list[dict[str, Any]]:
    """Rows with every required field a non-empty string, deduplicated by id and by question+schema; lines of
    the source that were no rows at all (`Rows.broken`) are counted as loaded and dropped by their reason."""
    rows, seen_ids, seen_keys = [], set(), set()
    for reason, count in getattr(dataset, "broken", {}).items():
        report.loaded += count
        report.dropped[reason] += count
    for row in dataset:
        report.loaded += 1
        problem = _problem(row)
        if problem:
            report.dropped[problem] += 1
            continue
        row = {**row, "id": _row_id(row)}
        key = _content_key(row)
        if str(row["id"]) in seen_ids or key in seen_keys:
            report.dropped["duplicate"] += 1
            continue
        seen_ids.add(str(row["id"]))
        seen_keys.add(key)
        rows.append(row)
    return rows


def _sample(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[: limit or len(rows)]]


def split_rows(splits: dict[str, Any], cfg: DataConfig, source: str) -> DataSplits:
    """Deterministic, disjoint train and eval rows (by `cfg.seed`), with per-split reports."""
    if cfg.train_split not in splits:
        raise ConfigError(f"data.train_split: {source} has no split {cfg.train_split!r} (has: {', '.join(splits)})")
    reports = {"train": SplitReport(), "eval": SplitReport()}
    train_rows = validate_rows(splits[cfg.train_split], reports["train"])
    carved = cfg.eval_split not in splits
    if carved:
        shuffled = _sample(train_rows, None, cfg.seed)
        n_eval = math.ceil(cfg.eval_fraction * len(shuffled))
        n_eval = min(n_eval, cfg.max_eval_rows or n_eval)
        eval_rows, train_rows = shuffled[:n_eval], shuffled[n_eval:]
        reports["train"].dropped["held_out_for_eval"] += n_eval
        reports["eval"].loaded = n_eval
    else:
        eval_rows = validate_rows(splits[cfg.eval_split], reports["eval"])
        sampled = _sample(eval_rows, cfg.max_eval_rows, cfg.seed)
        if len(sampled) < len(eval_rows):
            reports["eval"].dropped["not_sampled"] += len(eval_rows) - len(sampled)
        eval_rows = sampled
        eval_ids = {str(row["id"]) for row in eval_rows}
        eval_keys = {_content_key(row) for row in eval_rows}
        kept = [r for r in train_rows if str(r["id"]) not in eval_ids and _content_key(r) not in eval_keys]
        if len(kept) < len(train_rows):
            reports["train"].dropped["overlaps_eval"] += len(train_rows) - len(kept)
        train_rows = kept
    sampled = _sample(train_rows, cfg.max_train_rows, cfg.seed)
    if len(sampled) < len(train_rows):
        reports["train"].dropped["not_sampled"] += len(train_rows) - len(sampled)
    train_rows = sampled
    if not train_rows:
        raise ConfigError(f"data.source {source}: no usable training rows ({_dropped_summary(reports['train'])})")
    if not eval_rows:
        raise ConfigError(f"data.source {source}: no usable evaluation rows ({_dropped_summary(reports['eval'])})")
    reports["train"].kept, reports["eval"].kept = len(train_rows), len(eval_rows)
    return DataSplits(train=train_rows, eval=eval_rows, reports=reports, eval_carved=carved)


def _dropped_summary(report: SplitReport) -> str:
    if not report.dropped:
        return f"{report.loaded} rows loaded"
    return f"{report.loaded} loaded; dropped: " + ", ".join(f"{k} {v}" for k, v in report.dropped.most_common())


def load_splits(cfg: DataConfig) -> DataSplits:
    return split_rows(load_source(cfg.source, strict=cfg.strict), cfg, cfg.source)
