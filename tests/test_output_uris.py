"""Every option that names an output takes the same local-or-s3:// URI as `run --output` and publishes manifest
last, or refuses a URI it cannot use with exit 2 and writes nothing (never a local folder named `s3:`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from after_fixtures import one_line_error
from cli_runner import run_cli, sets

from job.errors import EXIT_USAGE
from job.storage import objects as storage

N_ROWS = 6


def _keys(s3_client, bucket: str, prefix: str) -> set[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def _manifest(s3_client, bucket: str, key: str) -> dict:
    return json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture
def predictions(tmp_path: Path, sample_path: Path) -> Path:
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()[:N_ROWS]]
    path = tmp_path / "inputs" / "predictions.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"id": r["id"], "sql": r["sql"]}) + "\n" for r in rows))
    return path


def _score(capsys, predictions: Path, sample_path: Path, *args: str):
    return run_cli(capsys, "score", "--predictions", str(predictions), "--rows", str(sample_path),
                   *sets("evaluation.test_suite_size=0", "evaluation.workers=1"), *args)


def test_score_output_s3_publishes_manifest_last_and_never_writes_locally(
    capsys, tmp_path, monkeypatch, predictions, sample_path, s3_bucket, s3_client
):
    monkeypatch.chdir(tmp_path)
    output = f"s3://{s3_bucket}/scores/s1"
    code, out, err = _score(capsys, predictions, sample_path, "--output", output)
    assert code == 0, err
    assert f"wrote {output}" in out
    keys = _keys(s3_client, s3_bucket, "scores/s1/")
    assert keys == {"metrics.json", "scored.jsonl", "manifest.json"}
    manifest = _manifest(s3_client, s3_bucket, "scores/s1/manifest.json")
    assert {f["path"] for f in manifest["files"]} == {"metrics.json", "scored.jsonl"}
    assert manifest["metrics"]["n_rows"] == N_ROWS and manifest["status"] == "completed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # no ./s3:/ folder, nothing else here

    code, _, err = _score(capsys, predictions, sample_path, "--output", output)
    one_line_error(code, err, EXIT_USAGE, "already holds results (metrics.json); pass --overwrite")
    s3_client.put_object(Bucket=s3_bucket, Key="scores/s1/notes.txt", Body=b"mine")  # not the job's
    code, _, err = _score(capsys, predictions, sample_path, "--output", output, "--overwrite")
    assert code == 0, err
    assert _keys(s3_client, s3_bucket, "scores/s1/") == {"metrics.json", "scored.jsonl", "manifest.json", "notes.txt"}


def test_prepare_output_s3_publishes_manifest_last(capsys, tmp_path, monkeypatch, tiny_model, sample_path,
                                                   s3_bucket, s3_client):
    monkeypatch.chdir(tmp_path)
    output = f"s3://{s3_bucket}/prepared/p1"
    args = ["prepare", *sets(f"model.name={tiny_model}", f"data.source={sample_path}"), "--output", output]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "train loaded" in out and f"wrote {output}" in out
    assert _keys(s3_client, s3_bucket, "prepared/p1/") == {"stats.json", "examples.jsonl", "eval_ids.json",
                                                          "manifest.json"}
    manifest = _manifest(s3_client, s3_bucket, "prepared/p1/manifest.json")
    assert manifest["status"] == "prepared" and len(manifest["files"]) == 3
    stats = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="prepared/p1/stats.json")["Body"].read())
    assert stats["splits"]["train"]["loaded"] == 400
    assert list(tmp_path.iterdir()) == []

    code, _, err = run_cli(capsys, *args)
    one_line_error(code, err, EXIT_USAGE, "already holds results (stats.json); pass --overwrite")
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err


def test_compare_output_s3_writes_one_object(capsys, tmp_path, monkeypatch, lora_run, s3_bucket, s3_client):
    monkeypatch.chdir(tmp_path)
    output = f"s3://{s3_bucket}/reports/compare.md"
    code, out, err = run_cli(capsys, "compare", str(lora_run), str(lora_run), "--output", output)
    assert code == 0, err
    body = s3_client.get_object(Bucket=s3_bucket, Key="reports/compare.md")["Body"].read().decode()
    assert body.startswith("| |") and body in out
    code, _, err = run_cli(capsys, "compare", str(lora_run), "--output", output)
    one_line_error(code, err, EXIT_USAGE, "already exists; pass --overwrite")
    code, _, err = run_cli(capsys, "compare", str(lora_run), "--output", output, "--overwrite")
    assert code == 0, err
    code, _, err = run_cli(capsys, "compare", str(lora_run), "--output", f"s3://{s3_bucket}/reports/")
    one_line_error(code, err, EXIT_USAGE, "names a folder")
    assert list(tmp_path.iterdir()) == []


def test_push_to_s3_and_pull_refuses_a_bucket_destination(capsys, tmp_path, monkeypatch, lora_run, s3_bucket,
                                                         s3_client):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "artifacts", "push", str(lora_run), f"s3://{s3_bucket}/runs/r1")
    assert code == 0, err
    manifest = _manifest(s3_client, s3_bucket, "runs/r1/manifest.json")
    assert _keys(s3_client, s3_bucket, "runs/r1/") == {f["path"] for f in manifest["files"]} | {"manifest.json"}

    code, _, err = run_cli(capsys, "artifacts", "pull", f"s3://{s3_bucket}/runs/r1", f"s3://{s3_bucket}/copy")
    one_line_error(code, err, EXIT_USAGE, "DEST s3://")
    assert "must be a local folder" in err
    code, _, err = run_cli(capsys, "artifacts", "push", f"s3://{s3_bucket}/runs/r1", f"s3://{s3_bucket}/copy")
    one_line_error(code, err, EXIT_USAGE, "RUN_DIR s3://")
    assert _keys(s3_client, s3_bucket, "copy") == set() and list(tmp_path.iterdir()) == []

    code, out, err = run_cli(capsys, "artifacts", "pull", f"s3://{s3_bucket}/runs/r1", f"file://{tmp_path}/pulled")
    assert code == 0, err
    assert out == f"pulled and verified {tmp_path}/pulled\n"
    assert json.loads((tmp_path / "pulled" / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize("uri", ["gs://bucket/x", "S3://bucket/x", "s3://", "s3:///x", "hf://org/name"])
def test_every_output_option_refuses_a_uri_it_cannot_use(capsys, tmp_path, monkeypatch, uri, predictions,
                                                          sample_path, lora_run):
    monkeypatch.chdir(tmp_path)
    commands = [
        ["run", "--output", uri],
        ["train", *sets(f"training.checkpoint_uri={uri}")],
        ["score", "--predictions", str(predictions), "--rows", str(sample_path), "--output", uri],
        ["prepare", *sets(f"data.source={sample_path}"), "--output", uri],
        ["evaluate", "--base-only", "--output", uri],
        ["export", str(lora_run), "--output", uri],
        ["compare", str(lora_run), "--output", uri],
        ["artifacts", "push", str(lora_run), uri],
        ["artifacts", "pull", str(lora_run), uri],
    ]
    for args in commands:
        code, out, err = run_cli(capsys, *args)
        one_line_error(code, err, EXIT_USAGE, uri if args[0] != "train" else "training.checkpoint_uri")
        assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_local_destinations_accept_file_uris(capsys, tmp_path, predictions, sample_path):
    code, _, err = _score(capsys, predictions, sample_path, "--output", f"file://{tmp_path}/scored")
    assert code == 0, err
    manifest = json.loads((tmp_path / "scored" / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == {"metrics.json", "scored.jsonl"}
    assert storage.sha256_file(tmp_path / "scored" / "scored.jsonl") == next(
        f["sha256"] for f in manifest["files"] if f["path"] == "scored.jsonl")


def test_score_reads_predictions_from_s3_and_ask_refuses_remote_schema(capsys, tmp_path, monkeypatch, predictions,
                                                                        sample_path, lora_run, s3_bucket, s3_client):
    monkeypatch.chdir(tmp_path)
    s3_client.upload_file(str(predictions), s3_bucket, "preds/p.jsonl")
    code, out, err = _score(capsys, predictions, sample_path)
    assert code == 0, err
    local = out
    code, out, err = run_cli(capsys, "score", "--predictions", f"s3://{s3_bucket}/preds/p.jsonl", "--rows",
                             str(sample_path), *sets("evaluation.test_suite_size=0", "evaluation.workers=1"))
    assert code == 0, err
    assert out == local  # the same predictions, the same scores
    code, _, err = run_cli(capsys, "score", "--predictions", f"s3://{s3_bucket}/preds/none.jsonl")
    assert code == 3 and "s3://" in err and "no such object" in err
    for option in ("--schema", "--file"):
        code, out, err = run_cli(capsys, "ask", "--run", str(lora_run), option, f"s3://{s3_bucket}/s.sql",
                                 *([] if option == "--file" else ["q"]))
        one_line_error(code, err, EXIT_USAGE, f"{option} s3://{s3_bucket}/s.sql: must be a local file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
