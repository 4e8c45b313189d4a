"""job.platforms.launch: torchrun whose exit code keeps the job's meaning (2, 3, 75) for podFailurePolicy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from job.platforms.launch import exit_code

REPO = Path(__file__).resolve().parents[1]
WORKER = """\
import os, sys
codes = [int(code) for code in sys.argv[1].split(",")]
sys.exit(codes[int(os.environ["RANK"])])
"""


@pytest.mark.parametrize(("codes", "expected"), [
    ([0, 0], 0), ([75, 75], 75), ([0, 75], 75), ([3, 75], 3), ([75, 2], 2), ([1, 75], 1), ([137, 0], 1),
    ([2, 3], 2), ([75, -15], 75), ([-9, -15], 1), ([3, -15], 3),
])
def test_exit_code_mapping(codes: list[int], expected: int):
    assert exit_code(codes) == expected


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("codes", "expected"), [("75,75", 75), ("0,3", 3), ("1,75", 1)])
def test_torchrun_workers_exit_codes_survive_the_launcher(tmp_path: Path, codes: str, expected: int):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "job.platforms.launch", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
         str(worker), codes], capture_output=True, text=True, timeout=100, cwd=REPO)
    assert result.returncode == expected, result.stderr[-3000:]
    if expected:
        assert f"-> exit {expected}" in result.stderr
