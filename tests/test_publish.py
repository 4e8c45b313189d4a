"""Manifests and publishing run folders (local and loopback S3), including an endpoint outage mid-publish."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from s3_fixtures import ACCESS_KEY, SECRET_KEY, CuttableProxy, make_run_folder, use_endpoint

from job.errors import ConfigError, JobError, MissingInputError
from job.storage import objects as storage
from job.storage.artifacts import pull_run
from job.storage.publish import MANIFEST, build_manifest, publish_run

CONFIG = {"model": {"name": "tiny"}, "output": {"uri": "s3://bucket/runs", "run_id": "run-1"}}


def _manifest(run: Path, started_at: str = "2025-01-01T00:00:00+00:00") -> dict[str, Any]:
    return build_manifest(run, config=CONFIG, status="completed", started_at=started_at,
                          ended_at="2025-01-01T01:00:00+00:00", metrics={"execution_accuracy": 0.5})


def _keys(client: Any, bucket: str, prefix: str) -> set[str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {obj["Key"].removeprefix(prefix) for obj in listing.get("Contents", [])}


def test_build_manifest(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path)
    (run / MANIFEST).write_text("{}")  # an old manifest is never listed in the new one
    before = set(sys.modules)
    manifest = _manifest(run)
    assert not {"torch", "transformers"} & (set(sys.modules) - before)  # versions come from metadata only
    paths = [f["path"] for f in manifest["files"]]
    assert MANIFEST not in paths and "adapter/adapter_model.safetensors" in paths and paths == sorted(paths)
    entry = next(f for f in manifest["files"] if f["path"] == "eval/report.md")
    assert entry == {"path": "eval/report.md", "size": 9, "sha256": storage.sha256_file(run / entry["path"])}
    assert manifest["run_id"] == "run-1" and manifest["status"] == "completed"
    assert manifest["metrics"] == {"execution_accuracy": 0.5} and manifest["config"] == CONFIG
    assert set(manifest["versions"]) == {"python", "torch", "transformers", "peft", "trl", "bitsandbytes",
                                         "datasets", "accelerate"}
    assert manifest["started_at"] and manifest["ended_at"]


def test_publish_in_place_writes_only_the_manifest(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path)
    before = storage.list_files(str(run))
    assert publish_run(run, str(tmp_path / "run-1"), _manifest(run)) == str(tmp_path / "run-1")
    assert set(storage.list_files(str(run))) == set(before) | {MANIFEST}


def test_publish_to_another_local_folder(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "stage")
    dest = f"file://{tmp_path}/published/run-1"
    publish_run(run, dest, _manifest(run))
    published = {rel: size for rel, size in storage.list_files(str(run)).items() if not rel.startswith("checkpoints/")}
    assert storage.list_files(dest) == published  # checkpoints are the mirror's, not part of the published run
    publish_run(run, dest)  # again, from the manifest already in run_dir
    assert pull_run(dest, tmp_path / "pulled") == tmp_path / "pulled"


def test_publish_to_s3_is_idempotent(s3_bucket: str, s3_client: Any, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    run = make_run_folder(tmp_path)
    manifest = _manifest(run)
    dest = f"s3://{s3_bucket}/runs/run-1"
    assert publish_run(run, dest + "/", manifest) == dest
    expected = {f["path"] for f in manifest["files"]} | {MANIFEST}
    assert _keys(s3_client, s3_bucket, "runs/run-1/") == expected
    assert json.loads(storage.read_text(f"{dest}/{MANIFEST}")) == manifest

    caplog.set_level(logging.INFO, logger="job")
    publish_run(run, dest)
    assert f"{dest}: uploaded 1 of {len(expected)} files" in caplog.text  # only the manifest, rewritten last
    assert _keys(s3_client, s3_bucket, "runs/run-1/") == expected


def test_publish_refuses_another_runs_destination(s3_bucket: str, tmp_path: Path) -> None:
    dest = f"s3://{s3_bucket}/runs/run-1"
    first = make_run_folder(tmp_path / "a")
    publish_run(first, dest, _manifest(first))
    other = make_run_folder(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"already holds another run \(run_id 'run-1', started '2025-01-01"):
        publish_run(other, dest, _manifest(other, started_at="2025-02-02T00:00:00+00:00"))
    assert storage.read_json(f"{dest}/{MANIFEST}")["started_at"].startswith("2025-01-01")
    publish_run(other, dest, replace=True)  # --overwrite
    assert storage.read_json(f"{dest}/{MANIFEST}")["started_at"].startswith("2025-02-02")


def test_publish_to_missing_bucket(s3_env: str, tmp_path: Path) -> None:
    run = make_run_folder(tmp_path)
    with pytest.raises(MissingInputError, match="bucket 'no-such-bucket-finetune' does not exist") as info:
        publish_run(run, "s3://no-such-bucket-finetune/runs/run-1", _manifest(run))
    assert f"local copy at {run} is intact" in str(info.value)


@pytest.mark.timeout(60)
def test_outage_mid_publish_then_publish_again(
    s3_env: str, s3_bucket: str, s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run_folder(tmp_path, adapter_bytes=3 * 1024 * 1024)
    manifest = _manifest(run)
    dest = f"s3://{s3_bucket}/runs/run-1"
    proxy = CuttableProxy(s3_env, cut_after=1024 * 1024)  # the endpoint dies 1 MiB into the publish
    use_endpoint(monkeypatch, proxy.url)

    with pytest.raises(JobError) as info:
        publish_run(run, dest, manifest)
    message = str(info.value)
    assert proxy.is_cut
    assert "adapter/adapter_model.safetensors" in message and "did not upload" in message
    assert "cannot reach the S3 endpoint" in message and f"local copy at {run} is intact" in message
    assert "No manifest was written" in message and "\n" not in message
    assert SECRET_KEY not in message and ACCESS_KEY not in message
    assert MANIFEST not in _keys(s3_client, s3_bucket, "runs/run-1/")
    assert "adapter/adapter_model.safetensors" not in _keys(s3_client, s3_bucket, "runs/run-1/")
    for entry in manifest["files"]:
        assert storage.sha256_file(run / entry["path"]) == entry["sha256"]

    use_endpoint(monkeypatch, s3_env)  # the endpoint is back
    publish_run(run, dest)
    assert _keys(s3_client, s3_bucket, "runs/run-1/") == {f["path"] for f in manifest["files"]} | {MANIFEST}
    pulled = pull_run(dest, tmp_path / "pulled")
    assert (pulled / "adapter/adapter_model.safetensors").read_bytes() == (
        run / "adapter/adapter_model.safetensors").read_bytes()


def test_credentials_never_in_manifest_or_logs(s3_bucket: str, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    run = make_run_folder(tmp_path)
    dest = f"s3://{s3_bucket}/runs/run-1"
    publish_run(run, dest, _manifest(run))
    pull_run(dest, tmp_path / "pulled")
    for text in (storage.read_text(f"{dest}/{MANIFEST}"), (run / MANIFEST).read_text()):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert SECRET_KEY not in caplog.text  # botocore's own DEBUG lines included
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("job"))
    assert ours and SECRET_KEY not in ours and ACCESS_KEY not in ours
