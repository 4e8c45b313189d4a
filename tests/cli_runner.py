"""Run the real `finetune` entry point in-process (models stay imported) and capture its exit code."""

from __future__ import annotations

import pytest

from job.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `finetune ARGS`."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def sets(*items: str) -> list[str]:
    """--set K=V for each item."""
    return [arg for item in items for arg in ("--set", item)]
