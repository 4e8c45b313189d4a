"""JSON-lines files given on the command line (predictions, questions): records, or one line naming the bad one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from job.errors import ConfigError


def read_records(path: Path, option: str, valid: Callable[[Any], bool], expected: str) -> list[dict[str, Any]]:
    """The records of `path` (blank lines skipped); a line that is not JSON, or not `valid`, is a usage error
    `OPTION PATH:LINE: ...` saying what was `expected`. The caller checks that the file exists."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{option} {path}:{number}: not JSON ({exc.msg})") from None
        if not valid(record):
            raise ConfigError(f"{option} {path}:{number}: expected {expected}")
        records.append(record)
    return records
