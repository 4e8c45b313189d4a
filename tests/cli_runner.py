"""Run the real `finetune` entry point in-process (models stay imported) and capture its exit code."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

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


def preempt_after_logged_steps(
    command: list[str], env: dict[str, str], log: Path, steps: int = 5
) -> tuple[int, str]:
    """Run COMMAND in a subprocess, SIGTERM it once `log` (train_log.jsonl) has `steps` lines: (exit code, stderr)."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= steps:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    return code, process.stderr.read()
