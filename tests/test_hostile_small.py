"""The smaller hostile cases: report cells that cannot break tables or inject HTML, URL credentials never in a log
or error line, and SIGTERM during `score` exiting 75 with nothing published."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.errors import EXIT_PREEMPTED, redact
from job.evaluation.report import write_reports
from job.evaluation.scoring import ScoringSettings, score_predictions

HOSTILE_GROUP = "a|b\nc <script>alert(1)</script> [x](http://evil) *em* $\\frac{1}{$ `code`"


def test_report_cells_from_the_data_cannot_break_tables_or_inject_html(tmp_path):
    rows = [{"id": f"<img src=x onerror=alert({i})>", "sql_prompt": "q <b>bold</b> **x**", "sql": "SELECT 1",
             "sql_context": "CREATE TABLE t (a INT);", "domain": HOSTILE_GROUP, "sql_complexity": HOSTILE_GROUP,
             "sql_task_type": f"{HOSTILE_GROUP} {i}"} for i in range(2)]
    metrics, records = score_predictions(rows, [{"id": r["id"], "sql": "SELECT 2"} for r in rows],
                                         settings=ScoringSettings(test_suite_size=0, workers=1))
    write_reports(tmp_path, {"tuned": metrics}, {"tuned": records}, title="model <i>x</i>")
    markdown = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    for text in (markdown, page):
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>bold" not in text
        assert "<i>x" not in text
    for table in re.findall(r"(?:^\|.*\|\n)+", markdown, re.M):  # every row of a table has the header's columns
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(widths) == 1, table
    assert "[x](http://evil)" not in markdown and "\\[x\\](http://evil)" in markdown
    assert "a\\|b c &lt;script&gt;" in markdown  # one line, the pipe escaped


def test_redact_removes_url_credentials_and_session_tokens():
    assert redact("endpoint http://AKIA:p@ss/w0rd@minio:9000/b ok") == "endpoint http://***@minio:9000/b ok"
    assert redact("'X-Amz-Security-Token': b'IQoJb3JpZ2luX2VjEPH//////////wEaCXVzLWVhc3QtMSJH'") == \
        "'X-Amz-Security-Token': b'***'"
    assert redact("s3://bucket/key and http://127.0.0.1:9000/x") == "s3://bucket/key and http://127.0.0.1:9000/x"


def _finetune(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "job", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_verbose_logs_and_error_lines_never_show_url_credentials(s3_env, s3_bucket, tmp_path):
    endpoint = s3_env.replace("http://", "http://finetune-user:Sup3rSecretPw@")
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    result = _finetune("-v", "artifacts", "ls", f"s3://{s3_bucket}/runs", env=env)
    assert "Sup3rSecretPw" not in result.stdout + result.stderr and "finetune-user" not in result.stderr
    assert "***@127.0.0.1" in result.stderr  # botocore's debug lines name the endpoint, redacted
    source = "https://reader:Sup3rSecretPw@data.example/rows.jsonl"
    result = _finetune("prepare", "--set", f"data.source={source}", env=env)
    assert result.returncode == 2 and "Sup3rSecretPw" not in result.stderr
    assert "error: data.source https://***@data.example/rows.jsonl" in result.stderr


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc (Linux)")
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_score_exits_75_and_publishes_nothing(tmp_path, sample_path, workers):
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": r["id"], "sql": r["sql"]}) + "\n" for r in rows))
    out = tmp_path / "scored"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_") or k == "FINETUNE_CACHE_DIR"}
    process = subprocess.Popen(
        [sys.executable, "-m", "job", "score", "--predictions", str(predictions), "--rows", str(sample_path),
         "--output", str(out), "--set", f"evaluation.workers={workers}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if _catches_sigterm(process.pid) and (workers == 1 or len(_children(process.pid)) >= workers):
            break
        time.sleep(0.05)
    workers_seen = _children(process.pid) if workers > 1 else []
    time.sleep(0.5)  # well inside the scoring (400 rows with test suites take minutes on 2 cores)
    process.send_signal(signal.SIGTERM)
    start = time.monotonic()
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert code == EXIT_PREEMPTED, stderr
    assert time.monotonic() - start < 20  # not after scoring the rest
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: stopped by SIGTERM before its results were complete (no manifest.json was written); "
                      "run the same command again"]
    assert "Traceback" not in stderr and not out.exists()
    time.sleep(0.5)
    assert not [pid for pid in workers_seen if Path(f"/proc/{pid}").exists()]  # no scoring worker left behind
