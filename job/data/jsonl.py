"""JSON-lines files (data sources, predictions, questions): records line by line, each bad line named by its
number and cause, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.errors import CorruptInputError

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class BadLine:
    """A line that is not a JSON object: `reason` is its drop reason (not_utf8, not_json, not_an_object)."""

    number: int
    reason: str
    detail: str


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or BadLine) for every non-blank line of `path`, read as UTF-8 (a leading BOM
    is skipped). A value that is not a JSON object is a BadLine too, as is one holding an escaped lone surrogate
    (`"\\ud800"`), which is not text."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadLine(number, "not_utf8",
                                      f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
                continue
            if not line.strip():
                continue
            yield number, _parse(number, line.rstrip("\r\n"))


def _parse(number: int, line: str) -> Any:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadLine(number, "not_json", f"not JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return BadLine(number, "not_json", "not JSON this job reads (nested too deeply)")
    return checked_object(number, value, "\\u" in line)


def checked_object(number: int, value: Any, escapes: bool = True) -> Any:
    """`value` if it is a JSON object of real text, else the BadLine saying why (`escapes`: it may hold an
    escaped lone surrogate, `"\\ud800"`, which decodes to no text; checked only then, as it costs a dump)."""
    if not isinstance(value, dict):
        return BadLine(number, "not_an_object", f"expected a JSON object, got {type(value).__name__}")
    if escapes:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return BadLine(number, "not_utf8", "holds an escaped lone surrogate (\\ud800-\\udfff), which is not text")
    return value


def read_records(path: Path, option: str, valid: Callable[[Any], bool], expected: str) -> list[dict[str, Any]]:
    """The records of `path` (blank lines skipped); the first line that is not UTF-8, not a JSON object or not
    `valid` is a CorruptInputError `OPTION PATH:LINE: cause` (exit 3). The caller checks that the file exists."""
    records = []
    for number, record in json_lines(path):
        if isinstance(record, BadLine):
            raise CorruptInputError(f"{option} {path}:{number}: {record.detail}")
        if not valid(record):
            raise CorruptInputError(f"{option} {path}:{number}: expected {expected}")
        records.append(record)
    return records
