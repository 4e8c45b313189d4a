"""Listing and pulling published runs (loopback S3 and local), and what the AWS CLI sees of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from s3_fixtures import make_run_folder

from job.errors import JobError, MissingInputError
from job.storage import objects as storage
from job.storage.artifacts import list_runs, pull_run
from job.storage.publish import MANIFEST, build_manifest, publish_run


def _publish(root: Path, dest_root: str, run_id: str, **manifest: Any) -> dict[str, Any]:
    run = make_run_folder(root, run_id)
    fields = {"config": {"run": run_id}, "status": "completed", "started_at": "2025-01-01T00:00:00+00:00",
              "ended_at": "2025-01-01T01:00:00+00:00", "metrics": {"execution_accuracy": 0.5}} | manifest
    built = build_manifest(run, **fields)
    publish_run(run, storage.join(dest_root, run_id), built)
    return built


def test_list_and_pull_runs_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    root = f"s3://{s3_bucket}/runs"
    first = _publish(tmp_path / "stage", root, "run-a")
    _publish(tmp_path / "stage", root, "run-b", status="failed", metrics=None, ended_at="2025-01-02T00:00Z")
    half = make_run_folder(tmp_path / "stage", "run-c")
    storage.upload_dir(half, f"{root}/run-c")  # files, but no manifest: still publishing, or failed

    runs = list_runs(root)
    assert [r["run_id"] for r in runs] == ["run-a", "run-b", "run-c"]
    assert runs[0] == {"run_id": "run-a", "uri": f"{root}/run-a", "complete": True, "problem": None,
                       "status": "completed", "metrics": {"execution_accuracy": 0.5},
                       "started_at": "2025-01-01T00:00:00+00:00", "ended_at": "2025-01-01T01:00:00+00:00"}
    assert runs[1]["status"] == "failed" and runs[1]["metrics"] == {}
    assert runs[2]["complete"] is False and runs[2]["status"] is None
    assert list_runs(f"s3://{s3_bucket}/nothing") == []

    dest = tmp_path / "pulled"
    assert pull_run(f"{root}/run-a/", dest) == dest
    for entry in first["files"]:
        assert storage.sha256_file(dest / entry["path"]) == entry["sha256"]
    assert json.loads((dest / MANIFEST).read_text()) == first
    assert pull_run(f"{root}/run-a", dest) == dest  # same run already there: verified, nothing refetched

    with pytest.raises(JobError, match="not empty and does not hold run 'run-b'; refusing to overwrite"):
        pull_run(f"{root}/run-b", dest)
    with pytest.raises(MissingInputError, match=f"{root}/run-c: incomplete run \\(no manifest.json\\)"):
        pull_run(f"{root}/run-c", tmp_path / "c")
    with pytest.raises(MissingInputError, match=f"{root}/run-z: no run here"):
        pull_run(f"{root}/run-z", tmp_path / "z")
    assert not (tmp_path / "c").exists() and not (tmp_path / "z").exists()


def test_pull_detects_a_corrupt_object(s3_bucket: str, s3_client: Any, tmp_path: Path) -> None:
    root = f"s3://{s3_bucket}/runs"
    _publish(tmp_path / "stage", root, "run-a")
    key = "runs/run-a/adapter/adapter_config.json"
    original = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=original.replace(b"8", b"9"))  # same size, bit rot

    dest = tmp_path / "pulled"
    with pytest.raises(JobError, match=f"{root}/run-a/adapter/adapter_config.json: checksum mismatch"):
        pull_run(f"{root}/run-a", dest)
    assert not (dest / "adapter/adapter_config.json").exists()
    assert not (dest / MANIFEST).exists()  # the local copy does not look complete either

    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=original)  # repaired: the interrupted pull resumes
    pull_run(f"{root}/run-a", dest)
    assert (dest / "adapter/adapter_config.json").read_bytes() == original and (dest / MANIFEST).is_file()


def test_list_and_pull_local_runs(tmp_path: Path) -> None:
    root = str(tmp_path / "published")
    manifest = _publish(tmp_path / "stage", root, "run-a")
    make_run_folder(tmp_path / "published", "run-b")  # no manifest
    assert [(r["run_id"], r["complete"]) for r in list_runs(root)] == [("run-a", True), ("run-b", False)]
    dest = pull_run(f"file://{root}/run-a", tmp_path / "pulled")
    assert json.loads((dest / MANIFEST).read_text()) == manifest
    with pytest.raises(storage.NotFound):
        list_runs(str(tmp_path / "missing"))


def test_aws_cli_sees_the_published_layout(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    manifest = _publish(tmp_path / "stage", f"s3://{s3_bucket}/team/runs", "run-a")
    aws = [str(Path(sys.executable).with_name("aws")), "--endpoint-url", s3_env]

    def cli(*args: str) -> str:
        done = subprocess.run([*aws, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ),
                              check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = cli("s3", "ls", "--recursive", f"s3://{s3_bucket}/team/runs/")
    keys = {line.split()[-1] for line in listing.splitlines()}
    assert {"team/runs/run-a/manifest.json", "team/runs/run-a/adapter/adapter_model.safetensors"} <= keys
    assert not any("/checkpoints/" in key for key in keys), "publishing copies no checkpoints (the mirror does)"
    assert keys == {f"team/runs/run-a/{f['path']}" for f in [*manifest["files"], {"path": MANIFEST}]}
    assert "PRE run-a/" in cli("s3", "ls", f"s3://{s3_bucket}/team/runs/")
    assert json.loads(cli("s3", "cp", f"s3://{s3_bucket}/team/runs/run-a/manifest.json", "-")) == manifest
