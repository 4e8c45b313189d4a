"""Experiment trackers through transformers' integrations: MLflow on a local file store and W&B offline get the
training metrics under the run id and the eval metrics at the end; no credential reaches logs, configs or
manifests; an unknown or missing tracker is a one-line configuration error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from after_fixtures import FAST_TRAIN, one_line_error
from cli_runner import run_cli, sets

from job.config import load_config
from job.errors import EXIT_USAGE

SECRET = "s3cr3t-value-never-logged"


def _run(capsys, tmp_path, base, rows, tracker, run_id):
    settings = [s for s in FAST_TRAIN if not s.startswith("training.report_to")]
    args = ["run", "--config", "gemma-2b-it-lora", "--output", str(tmp_path / "runs"), "--run-id", run_id,
            *sets(f"model.name={base}", f"data.source={rows}", "training.max_steps=5", f"training.report_to={tracker}",
                  *settings)]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 0, stderr
    return tmp_path / "runs" / run_id, stdout + stderr


def _assert_no_secret(*roots: Path, text: str = "") -> None:
    assert SECRET not in text
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_mlflow_gets_training_and_eval_metrics_under_the_run_id(capsys, tmp_path, monkeypatch, eos_only_base,
                                                               short_rows):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store for local use
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "text-to-sql")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    run_dir, output = _run(capsys, tmp_path, eos_only_base, short_rows, "mlflow", "mlflow-run-1")

    mlflow.set_tracking_uri(store.as_uri())
    runs = mlflow.search_runs(experiment_names=["text-to-sql"], output_format="list")
    assert [r.info.run_name for r in runs] == ["mlflow-run-1"]
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in losses] == [5]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = client.get_run(runs[0].info.run_id).data.metrics
    assert metrics["eval/tuned/execution_accuracy"] == pytest.approx(manifest["metrics"]["tuned"]["execution_accuracy"])
    assert metrics["eval/tuned/n_rows"] == 1
    _assert_no_secret(store, run_dir, text=output)
    assert "report_to: mlflow" in (run_dir / "config.yaml").read_text()


def test_wandb_offline_gets_training_and_eval_metrics_under_the_run_id(capsys, tmp_path, monkeypatch,
                                                                      eos_only_base, short_rows):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "text-to-sql")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_RUN_ID", "replaced-by-the-job")  # the job sets it; teardown restores the environment
    run_dir, output = _run(capsys, tmp_path, eos_only_base, short_rows, "wandb", "wandb.run.1")
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert run.name.endswith("-wandb-run-1")  # the run id, made W&B-safe, is the W&B run id
    keys = (b"train/loss", b"eval/tuned/execution_accuracy", b"eval/tuned/valid_sql_rate", b"wandb.run.1")
    deadline = time.monotonic() + 60
    while True:  # W&B's service process writes the offline log (protobuf: key names verbatim) asynchronously
        records = b"".join(path.read_bytes() for path in run.glob("*.wandb"))
        if all(key in records for key in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in records, key
    _assert_no_secret(tmp_path / "wandb", run_dir, text=output)


def test_unknown_or_missing_tracker_is_a_config_error(capsys, monkeypatch, tmp_path):
    code, _, stderr = run_cli(capsys, "train", "--config", "gemma-2b-it-lora", "--output", str(tmp_path),
                              "--set", "training.report_to=comet")
    one_line_error(code, stderr, EXIT_USAGE, "training.report_to")
    assert not any(tmp_path.iterdir())

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(Exception, match=r"needs the mlflow package: pip install 'finetune-job\[tracking\]'"):
        load_config("gemma-2b-it-lora", ["training.report_to=mlflow"], environ={})
    assert load_config("gemma-2b-it-lora", ["training.report_to=none"], environ={}).training.report_to == "none"
