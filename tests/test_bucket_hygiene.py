"""A bucket that stays clean (loopback S3): remote checkpoints pruned to save_total_limit, checkpoints listed
apart from the published run and pulled only on request, `--overwrite` leaving no object of the old run, a
preempted overwrite resumed by the same command, and SageMaker's model.tar.gz understood by `artifacts pull`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cli_runner import preempt_after_logged_steps, run_cli, sets
from s3_fixtures import make_run_folder

from job.config import load_config
from job.errors import EXIT_PREEMPTED, MissingInputError
from job.storage import objects as storage
from job.storage.artifacts import pull_run
from job.storage.publish import MANIFEST, build_manifest, publish_run
from job.storage.run_folder import OVERWRITE_MARKER
from job.train.checkpoints import TRAINER_STATE, latest_complete_checkpoint, prune_checkpoints
from job.train.resume import plan_run


def _keys(client: Any, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def _upload_checkpoint(uri: str, step: int, tmp: Path, complete: bool = True) -> None:
    folder = tmp / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes([step]) * 64)
    (folder / "optimizer.pt").write_bytes(b"o" * 128)
    if complete:
        (folder / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    storage.upload_dir(folder, storage.join(uri, folder.name), last=TRAINER_STATE if complete else None)


def _manifest(run: Path, started_at: str, checkpoint_uri: str | None = None) -> dict[str, Any]:
    config = {"training": {"checkpoint_uri": checkpoint_uri}, "output": {"run_id": run.name}}
    return build_manifest(run, config=config, status="completed", started_at=started_at,
                          ended_at=started_at, metrics=None)


def test_prune_keeps_the_newest_complete_checkpoints(s3_bucket: str, s3_client: Any, tmp_path: Path):
    uri = f"s3://{s3_bucket}/ckpt/run-1"
    _upload_checkpoint(uri, 1, tmp_path, complete=False)  # a torn upload from long ago
    for step in (2, 4, 6):
        _upload_checkpoint(uri, step, tmp_path)
    _upload_checkpoint(uri, 8, tmp_path, complete=False)  # the upload in flight
    assert prune_checkpoints(uri, keep=2) == ["checkpoint-2", "checkpoint-1"]
    assert {key.split("/")[0] for key in _keys(s3_client, s3_bucket, "ckpt/run-1/")} == {
        "checkpoint-4", "checkpoint-6", "checkpoint-8"}
    assert latest_complete_checkpoint(uri) == f"{uri}/checkpoint-6"
    assert prune_checkpoints(uri, keep=2) == []  # nothing more to do
    assert prune_checkpoints(uri, keep=5) == []  # fewer complete ones than the limit: keep everything


def test_mirror_prunes_to_the_trainers_save_total_limit(s3_bucket: str, s3_client: Any, tmp_path: Path):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from job.train.checkpoints import CheckpointMirror

    uri = f"s3://{s3_bucket}/runs/r1/checkpoints"
    mirror = CheckpointMirror(uri)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), save_total_limit=2)
    for step in (2, 4, 6, 8):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"a" * 32)
        (folder / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
        mirror.on_save(args, TrainerState(global_step=step), TrainerControl())
    mirror.wait()
    assert {key.split("/")[0] for key in _keys(s3_client, s3_bucket, "runs/r1/checkpoints/")} == {
        "checkpoint-6", "checkpoint-8"}


def test_manifest_lists_checkpoints_apart_and_pull_fetches_them_only_on_request(
    s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    dest = f"s3://{s3_bucket}/runs/run-1"
    run = make_run_folder(tmp_path / "stage")
    storage.upload_dir(run / "checkpoints", f"{dest}/checkpoints")  # what the mirror did during training
    manifest = _manifest(run, "2025-01-01T00:00:00+00:00", checkpoint_uri=f"{dest}/checkpoints")
    assert not any(f["path"].startswith("checkpoints/") for f in manifest["files"])
    assert manifest["checkpoints"]["uri"] == f"{dest}/checkpoints"
    assert [f["path"] for f in manifest["checkpoints"]["files"]] == ["checkpoint-2/trainer_state.json"]
    publish_run(run, dest, manifest)

    plain = pull_run(dest, tmp_path / "plain")
    assert not (plain / "checkpoints").exists() and (plain / "adapter" / "adapter_model.safetensors").is_file()
    code, _, err = run_cli(capsys, "artifacts", "pull", dest, str(tmp_path / "full"), "--with-checkpoints")
    assert code == 0, err
    assert json.loads((tmp_path / "full/checkpoints/checkpoint-2" / TRAINER_STATE).read_text()) == {"global_step": 2}

    storage.remove_tree(f"{dest}/checkpoints")  # pruned or deleted since
    code, _, err = run_cli(capsys, "artifacts", "pull", dest, str(tmp_path / "gone"), "--with-checkpoints")
    assert code == 3 and "checkpoints of run 'run-1' are gone" in err and "Traceback" not in err


def test_overwrite_commits_the_new_manifest_then_leaves_no_old_object(s3_bucket: str, s3_client: Any,
                                                                       tmp_path: Path):
    dest = f"s3://{s3_bucket}/runs/run-1"
    old = make_run_folder(tmp_path / "old")
    (old / "eval" / "only-in-the-old-run.txt").write_text("old")
    storage.upload_dir(old / "checkpoints", f"{dest}/checkpoints")
    publish_run(old, dest, _manifest(old, "2025-01-01T00:00:00+00:00", f"{dest}/checkpoints"))
    old_keys = _keys(s3_client, s3_bucket, "runs/run-1/")
    assert "eval/only-in-the-old-run.txt" in old_keys

    from job.storage.run_folder import begin_overwrite

    new = make_run_folder(tmp_path / "new", adapter_bytes=8192)
    shutil.rmtree(new / "checkpoints")
    begin_overwrite(new, dest, f"{dest}/checkpoints")
    assert pull_run(dest, tmp_path / "still-old")  # until the new manifest is committed, the old run is whole
    assert not any(key.startswith("checkpoints/") for key in _keys(s3_client, s3_bucket, "runs/run-1/"))
    _upload_checkpoint(f"{dest}/checkpoints", 3, new / "checkpoints")  # the new run's mirror
    manifest = _manifest(new, "2025-02-02T00:00:00+00:00", f"{dest}/checkpoints")
    publish_run(new, dest, manifest, replace=True)

    keys = _keys(s3_client, s3_bucket, "runs/run-1/")
    listed = {f["path"] for f in manifest["files"]} | {MANIFEST}
    listed |= {f"checkpoints/{f['path']}" for f in manifest["checkpoints"]["files"]}
    assert keys == listed, "every object left is one the new manifest lists"
    for entry in manifest["files"]:  # ...with the new run's content
        head = s3_client.head_object(Bucket=s3_bucket, Key=f"runs/run-1/{entry['path']}")
        assert head["Metadata"]["sha256"] == entry["sha256"]
    assert OVERWRITE_MARKER not in keys and not (new / OVERWRITE_MARKER).exists()
    pulled = pull_run(dest, tmp_path / "pulled", with_checkpoints=True)
    assert json.loads((pulled / MANIFEST).read_text())["started_at"].startswith("2025-02-02")


def test_preempted_overwrite_resumes_with_the_same_command(s3_bucket: str, s3_client: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """Run-folder level: the second `--overwrite` of a preempted one on a new machine resumes it."""
    output = f"s3://{s3_bucket}/runs"
    cfg = load_config("gemma-2b-it-lora", [f"output.uri={output}", "output.run_id=r1"])
    dest = f"{output}/r1"
    old = make_run_folder(tmp_path / "old", "r1")
    _upload_checkpoint(f"{dest}/checkpoints", 50, tmp_path / "old-ckpt")
    publish_run(old, dest, _manifest(old, "2025-01-01T00:00:00+00:00", f"{dest}/checkpoints"))

    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "machine-1"))
    plan_run(cfg, "auto", overwrite=True)
    assert latest_complete_checkpoint(f"{dest}/checkpoints") is None, "the old run's checkpoints must not resume"
    _upload_checkpoint(f"{dest}/checkpoints", 4, tmp_path / "new-ckpt")  # the new run's progress, then SIGTERM

    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "machine-2"))  # a new machine, an empty disk
    plan = plan_run(cfg, "auto", overwrite=True)
    folder = plan.run
    assert latest_complete_checkpoint(f"{dest}/checkpoints") == f"{dest}/checkpoints/checkpoint-4"
    assert plan.checkpoint == str(folder.path / "checkpoints" / "checkpoint-4")  # fetched: the new run continues
    assert (folder.path / OVERWRITE_MARKER).is_file()
    assert storage.read_json(f"{dest}/{MANIFEST}")["started_at"].startswith("2025-01-01")  # old run still whole

    (folder.path / "adapter").mkdir()
    (folder.path / "adapter" / "adapter_model.safetensors").write_bytes(b"new")
    assert (folder.path / "checkpoints" / "checkpoint-4" / TRAINER_STATE).is_file()
    manifest = _manifest(folder.path, "2025-03-03T00:00:00+00:00", f"{dest}/checkpoints")
    publish_run(folder.path, dest, manifest)  # as the pipeline republishes: the marker stands for --overwrite
    keys = _keys(s3_client, s3_bucket, "runs/r1/")
    assert "checkpoints/checkpoint-50/optimizer.pt" not in keys and "eval/report.md" not in keys
    assert OVERWRITE_MARKER not in keys

    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "machine-3"))
    plan_run(cfg, "auto", overwrite=True)  # committed: a later --overwrite starts afresh
    assert latest_complete_checkpoint(f"{dest}/checkpoints") is None


def _tiny_overrides(tiny_model: Path, sample: Path, *extra: str) -> list[str]:
    return sets(
        f"model.name={tiny_model}", f"data.source={sample}", "data.max_train_rows=32", "data.max_eval_rows=4",
        "training.per_device_batch_size=2", "training.gradient_accumulation_steps=1", "training.logging_steps=1",
        "training.gradient_checkpointing=false", *extra,
    )


@pytest.mark.timeout(600)
def test_preempted_overwrite_of_a_real_run_resumes_and_leaves_a_clean_bucket(
    tmp_path: Path, tiny_model: Path, sample_path: Path, s3_bucket: str, s3_client: Any, s3_env: str
):
    output = f"s3://{s3_bucket}/runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_") or k.startswith("FINETUNE_S3")}
    base = [sys.executable, "-m", "job", "train", "--config", "gemma-2b-it-lora", "--output", output,
            "--run-id", "r9"]
    old = make_run_folder(tmp_path / "old", "r9")  # the published run being replaced, and its checkpoints
    (old / "eval" / "only-in-the-old-run.txt").write_text("old")
    storage.upload_dir(old / "checkpoints", f"{output}/r9/checkpoints")
    publish_run(old, f"{output}/r9", _manifest(old, "2025-01-01T00:00:00+00:00", f"{output}/r9/checkpoints"))
    assert "checkpoints/checkpoint-2/trainer_state.json" in _keys(s3_client, s3_bucket, "runs/r9/")

    command = [*base, "--overwrite", *_tiny_overrides(
        tiny_model, sample_path, "training.max_steps=12", "training.save_steps=2", "training.save_total_limit=2",
        "training.learning_rate=1e-3")]
    disk = tmp_path / "m1"
    log = disk / "r9" / "logs" / "train_log.jsonl"
    code, stderr = preempt_after_logged_steps(command, {**env, "FINETUNE_WORK_DIR": str(disk)}, log)
    assert code == EXIT_PREEMPTED, stderr
    assert storage.read_json(f"{output}/r9/{MANIFEST}")["started_at"].startswith("2025-01-01")  # old run whole
    shutil.rmtree(disk)

    second = subprocess.run(command, env={**env, "FINETUNE_WORK_DIR": str(tmp_path / "m2")}, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr
    manifest = storage.read_json(f"{output}/r9/{MANIFEST}")
    assert manifest["config"]["training"]["max_steps"] == 12
    keys = _keys(s3_client, s3_bucket, "runs/r9/")
    listed = {f["path"] for f in manifest["files"]} | {MANIFEST}
    listed |= {f"checkpoints/{f['path']}" for f in manifest["checkpoints"]["files"]}
    assert keys == listed and "eval/only-in-the-old-run.txt" not in keys, "no object of the old run survives"
    assert {key.split("/")[1] for key in keys if key.startswith("checkpoints/")} == {
        "checkpoint-10", "checkpoint-12"}, "pruned to save_total_limit"
    pulled = pull_run(f"{output}/r9", tmp_path / "pulled")
    assert not (pulled / "checkpoints").exists()


def test_pull_understands_a_sagemaker_model_tar_gz(s3_bucket: str, tmp_path: Path):
    run = make_run_folder(tmp_path / "ml" / "model", "finetune-2026-12-02")
    shutil.rmtree(run / "checkpoints")
    publish_run(run, str(run), _manifest(run, "2025-01-01T00:00:00+00:00"))
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # what SageMaker makes of /opt/ml/model
        tar.add(tmp_path / "ml" / "model", arcname=".")
    job_output = f"s3://{s3_bucket}/sagemaker-output/finetune-2026-12-02/output"
    storage.upload_file(archive, f"{job_output}/model.tar.gz")

    for source, dest in ((f"{job_output}/model.tar.gz", "a"), (job_output, "b"), (str(archive), "c")):
        pulled = pull_run(source, tmp_path / dest)
        assert (pulled / "adapter" / "adapter_model.safetensors").read_bytes() == (
            run / "adapter" / "adapter_model.safetensors").read_bytes()
        assert json.loads((pulled / MANIFEST).read_text())["run_id"] == "finetune-2026-12-02"

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        import io

        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(Exception, match="cannot unpack"):
        pull_run(str(evil), tmp_path / "d")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(MissingInputError, match="expected one run"):
        empty = tmp_path / "empty.tar.gz"
        with tarfile.open(empty, "w:gz"):
            pass
        pull_run(str(empty), tmp_path / "e")


def test_preempted_local_overwrite_keeps_its_progress(tmp_path: Path):
    cfg = load_config("gemma-2b-it-lora", [f"output.uri={tmp_path / 'runs'}", "output.run_id=r1"])
    old = make_run_folder(tmp_path / "runs", "r1")
    publish_run(old, str(old), _manifest(old, "2025-01-01T00:00:00+00:00"))
    folder = plan_run(cfg, "auto", overwrite=True).run  # replaces the finished run...
    assert not (folder.path / "eval").exists() and (folder.path / OVERWRITE_MARKER).is_file()
    (folder.path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (folder.path / "checkpoints" / "checkpoint-4" / TRAINER_STATE).write_text('{"global_step": 4}')
    again = plan_run(cfg, "auto", overwrite=True).run  # ...and the same command after SIGTERM resumes it
    assert latest_complete_checkpoint(str(again.path / "checkpoints")) == str(again.path / "checkpoints/checkpoint-4")
    publish_run(again.path, str(again.path), _manifest(again.path, "2025-02-02T00:00:00+00:00"))
    assert not (again.path / OVERWRITE_MARKER).exists()
    assert not (plan_run(cfg, "auto", overwrite=True).run.path / "checkpoints").exists()  # committed: afresh
