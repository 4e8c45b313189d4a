"""A whole tiny run against a real S3 server on loopback: data from s3://, publish, ls, pull, resume from the bucket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from cli_runner import preempt_after_logged_steps, run_cli, sets
from s3_fixtures import ACCESS_KEY, SECRET_KEY

from job.errors import EXIT_PREEMPTED


def _overrides(tiny_model, data_source, *extra):
    return sets(
        f"model.name={tiny_model}", f"data.source={data_source}", "data.max_train_rows=32", "data.max_eval_rows=4",
        "evaluation.max_new_tokens=6", "training.per_device_batch_size=2", "training.gradient_accumulation_steps=1",
        "training.logging_steps=1", "training.learning_rate=5e-3", "training.gradient_checkpointing=false", *extra,
    )


def _keys(s3_client, bucket, prefix):
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def test_run_reads_model_and_data_from_s3_publishes_and_pulls(
    capsys, tmp_path, monkeypatch, tiny_model, sample_path, s3_bucket, s3_client
):
    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "work"))
    s3_client.upload_file(str(sample_path), s3_bucket, "data/rows.jsonl")
    for path in tiny_model.iterdir():  # the base model itself comes from the bucket too
        s3_client.upload_file(str(path), s3_bucket, f"models/tiny/{path.name}")
    output = f"s3://{s3_bucket}/runs"
    args = ["run", "--config", "gemma-2b-it-lora", "--output", output, "--run-id", "r1",
            *_overrides(f"s3://{s3_bucket}/models/tiny", f"s3://{s3_bucket}/data/rows.jsonl",
                        "training.max_steps=4", "training.save_steps=2")]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    keys = _keys(s3_client, s3_bucket, "runs/r1/")
    assert {"manifest.json", "config.yaml", "adapter/adapter_model.safetensors", "eval/report.html"} <= keys
    assert "checkpoints/checkpoint-4/trainer_state.json" in keys  # mirrored as training went

    code, out, _ = run_cli(capsys, "artifacts", "ls", output)
    assert code == 0 and "r1" in out and "completed" in out
    pulled = tmp_path / "pulled"
    code, out, err = run_cli(capsys, "artifacts", "pull", f"{output}/r1", str(pulled))
    assert code == 0, err
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert (pulled / "adapter" / "adapter_config.json").is_file() and manifest["metrics"]["tuned"]["n_rows"] == 4
    for path in pulled.rglob("*"):  # credentials never land in configs, logs or manifests
        if path.is_file() and path.suffix in {".json", ".jsonl", ".yaml", ".md", ".html"}:
            text = path.read_text()
            assert ACCESS_KEY not in text and SECRET_KEY not in text
    assert SECRET_KEY not in err

    code, _, err = run_cli(  # an adapter straight from the bucket, results back to it
        capsys, "evaluate", "--config", "gemma-2b-it-lora", "--adapter", f"{output}/r1/adapter",
        "--output", f"s3://{s3_bucket}/evals/e1", *_overrides(tiny_model, sample_path),
    )
    assert code == 0, err
    assert {"metrics.json", "report.html", "tuned/predictions.jsonl"} <= _keys(s3_client, s3_bucket, "evals/e1/")

    code, _, err = run_cli(capsys, *args)  # the published run is finished: refuse, touch nothing
    assert code == 2 and "--overwrite" in err
    assert json.loads(s3_client.get_object(Bucket=s3_bucket, Key="runs/r1/manifest.json")["Body"].read()) == manifest


def test_preempted_run_resumes_from_the_bucket_on_an_empty_disk(tmp_path, tiny_model, sample_path, s3_bucket, s3_env):
    output = f"s3://{s3_bucket}/runs"
    args = [sys.executable, "-m", "job", "train", "--config", "gemma-2b-it-lora", "--output", output, "--run-id", "r2",
            *_overrides(tiny_model, sample_path, "training.max_steps=40", "training.save_steps=2")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_") or k.startswith("FINETUNE_S3")}
    first_disk = tmp_path / "machine-1"
    log = first_disk / "r2" / "logs" / "train_log.jsonl"
    code, stderr = preempt_after_logged_steps(args, {**env, "FINETUNE_WORK_DIR": str(first_disk)}, log)
    assert code == EXIT_PREEMPTED, stderr
    shutil.rmtree(first_disk)  # the spot instance is gone, and its disk with it

    second = subprocess.run([*args, "--resume", "auto"], env={**env, "FINETUNE_WORK_DIR": str(tmp_path / "machine-2")},
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr and "checkpoint-" in second.stderr
    state = json.loads((tmp_path / "machine-2" / "r2" / "checkpoints" / "checkpoint-40" / "trainer_state.json")
                       .read_text())
    assert state["global_step"] == 40


def test_a_publish_that_never_finished_completes_on_rerun_or_push(
    capsys, tmp_path, monkeypatch, tiny_model, sample_path, s3_bucket, s3_client
):
    work = tmp_path / "work"
    monkeypatch.setenv("FINETUNE_WORK_DIR", str(work))
    args = ["train", "--config", "gemma-2b-it-lora", "--output", f"s3://{s3_bucket}/runs", "--run-id", "r3",
            *_overrides(tiny_model, sample_path, "training.max_steps=2")]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    s3_client.delete_object(Bucket=s3_bucket, Key="runs/r3/manifest.json")  # as if the upload died before the end

    code, _, err = run_cli(capsys, *args)  # --resume auto (default): finished locally, so only publish again
    assert code == 0, err
    assert "publishing it now" in err and "step 1/" not in err  # nothing was retrained
    assert "manifest.json" in _keys(s3_client, s3_bucket, "runs/r3/")

    s3_client.delete_object(Bucket=s3_bucket, Key="runs/r3/manifest.json")
    code, _, err = run_cli(capsys, "artifacts", "push", str(work / "r3"), f"s3://{s3_bucket}/runs/r3")
    assert code == 0, err
    assert "manifest.json" in _keys(s3_client, s3_bucket, "runs/r3/")
