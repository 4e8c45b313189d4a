"""Finding complete checkpoints (local and loopback S3), fetching them, and mirroring Trainer saves."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from s3_fixtures import CuttableProxy, use_endpoint

from job.errors import JobError, MissingInputError
from job.storage import objects as storage
from job.train import checkpoints as checkpoint_sync
from job.train.checkpoints import SNAPSHOT_DIR, TRAINER_STATE, fetch_checkpoint, latest_complete_checkpoint


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    """transformers, imported only by the tests that drive a real CallbackHandler."""
    import transformers

    return transformers


def _checkpoint(root: Path, step: int, weights: int = 2048) -> Path:
    """A Trainer-like checkpoint folder, trainer_state.json written last."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * (weights // 256))
    for name in ("adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(name.encode() * 10)
    (folder / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    return folder


def _layout(root: Path) -> Path:
    """checkpoint-1, -3 complete; -10 with a torn trainer_state.json; -12 without one; decoys."""
    for step in (1, 3, 10, 12):
        _checkpoint(root, step)
    (root / "checkpoint-10" / TRAINER_STATE).write_text('{"global_step": 1')
    (root / "checkpoint-12" / TRAINER_STATE).unlink()
    (root / "checkpoint-x").mkdir()
    (root / "runs").mkdir()
    (root / "checkpoint-20").write_text("a file, not a checkpoint")
    return root


def test_module_import_does_not_import_transformers() -> None:
    code = "import sys, job.train.checkpoints; assert not {'transformers', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_latest_complete_checkpoint_local(tmp_path: Path) -> None:
    root = _layout(tmp_path / "checkpoints")
    assert latest_complete_checkpoint(str(root)) == str(root / "checkpoint-3")
    assert latest_complete_checkpoint(str(tmp_path / "not-yet")) is None
    assert fetch_checkpoint(str(root / "checkpoint-3"), tmp_path / "x") == root / "checkpoint-3"


def test_latest_complete_checkpoint_remote_and_fetch(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/ckpt/run-1"
    storage.upload_dir(_layout(tmp_path / "checkpoints"), uri)
    assert latest_complete_checkpoint(uri) == f"{uri}/checkpoint-3"
    assert latest_complete_checkpoint(f"s3://{s3_bucket}/ckpt/none") is None

    local = fetch_checkpoint(f"{uri}/checkpoint-3", tmp_path / "resume")
    assert local == tmp_path / "resume" / "checkpoint-3"
    assert storage.list_files(str(local)) == storage.list_files(str(tmp_path / "checkpoints/checkpoint-3"))
    (local / "stale.bin").write_bytes(b"x")
    assert not (fetch_checkpoint(f"{uri}/checkpoint-3", tmp_path / "resume") / "stale.bin").exists()
    for incomplete in ("checkpoint-10", "checkpoint-12"):
        with pytest.raises(MissingInputError, match=f"{incomplete}: not a complete checkpoint"):
            fetch_checkpoint(f"{uri}/{incomplete}", tmp_path / "resume")


def _record_puts(events: list[tuple[str, str]]) -> Any:
    """Record when each PutObject starts and finishes, from botocore's own events on the job's S3 client."""
    client = storage.client()

    def started(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["recorded_key"] = params["Key"]
        events.append(("start", params["Key"]))

    def finished(context: dict[str, Any], **_: Any) -> None:
        events.append(("done", context["recorded_key"]))

    hooks = {"provide-client-params.s3.PutObject": started, "after-call.s3.PutObject": finished}
    for event, hook in hooks.items():
        client.meta.events.register(event, hook, unique_id=f"test-{event}")
    return lambda: [client.meta.events.unregister(event, unique_id=f"test-{event}") for event in hooks]


def test_mirror_uploads_each_save_trainer_state_last(hf: ModuleType, s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/ckpt/run-1"
    mirror = checkpoint_sync.CheckpointMirror(uri)
    assert isinstance(mirror, hf.TrainerCallback)
    handler = hf.trainer_callback.CallbackHandler([mirror], None, None, None, None)
    args, control = SimpleNamespace(output_dir=str(tmp_path / "checkpoints")), hf.TrainerControl()
    events: list[tuple[str, str]] = []
    unregister = _record_puts(events)
    try:
        for step in (2, 4):
            _checkpoint(tmp_path / "checkpoints", step)
            handler.on_save(args, hf.TrainerState(global_step=step), control)
            if step == 2:  # checkpoint rotation (save_total_limit) deletes it while it uploads
                shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-2")
        handler.on_train_end(args, hf.TrainerState(global_step=4), control)
    finally:
        unregister()

    for step in (2, 4):
        prefix = f"ckpt/run-1/checkpoint-{step}/"
        mine = [(kind, key.removeprefix(prefix)) for kind, key in events if key.startswith(prefix)]
        assert {key for _, key in mine} == {"adapter_model.safetensors", "adapter_config.json",
                                           "optimizer.pt", "scheduler.pt", "rng_state.pth", TRAINER_STATE}
        state_start = mine.index(("start", TRAINER_STATE))
        assert all(mine.index(("done", key)) < state_start for _, key in mine if key != TRAINER_STATE)
    # one upload in flight at a time: checkpoint-4 started after checkpoint-2 had finished
    assert events.index(("done", f"ckpt/run-1/checkpoint-2/{TRAINER_STATE}")) < min(
        i for i, (_, key) in enumerate(events) if "checkpoint-4" in key)
    assert latest_complete_checkpoint(uri) == f"{uri}/checkpoint-4"
    assert not (tmp_path / "checkpoints" / SNAPSHOT_DIR).exists()


def test_mirror_skips_other_ranks(hf: ModuleType, s3_bucket: str, tmp_path: Path) -> None:
    mirror = checkpoint_sync.CheckpointMirror(f"s3://{s3_bucket}/ckpt")
    _checkpoint(tmp_path, 2)
    mirror.on_save(SimpleNamespace(output_dir=str(tmp_path)),
                   hf.TrainerState(global_step=2, is_world_process_zero=False), hf.TrainerControl())
    mirror.wait()
    assert storage.list_files(f"s3://{s3_bucket}/ckpt") == {}


@pytest.mark.timeout(60)
def test_half_uploaded_checkpoint_never_counts(
    hf: ModuleType, s3_env: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = f"s3://{s3_bucket}/ckpt/run-1"
    out = tmp_path / "checkpoints"
    storage.upload_dir(_checkpoint(out, 2), f"{uri}/checkpoint-2", last=TRAINER_STATE)
    _checkpoint(out, 4, weights=3 * 1024 * 1024)
    proxy = CuttableProxy(s3_env, cut_after=1024 * 1024)
    use_endpoint(monkeypatch, proxy.url)

    mirror = checkpoint_sync.CheckpointMirror(uri)
    mirror.on_save(SimpleNamespace(output_dir=str(out)), hf.TrainerState(global_step=4), hf.TrainerControl())
    with pytest.raises(JobError, match=rf"checkpoint mirror to {uri}: 1 upload\(s\) failed: checkpoint-4: .*"
                                       r"cannot reach the S3 endpoint .*local checkpoints are intact"):
        mirror.wait()
    assert proxy.is_cut
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("upload of checkpoint-4" in message for message in errors)
    mirror.wait()  # reported once

    use_endpoint(monkeypatch, s3_env)
    remote = storage.list_files(f"{uri}/checkpoint-4")
    assert TRAINER_STATE not in remote
    assert latest_complete_checkpoint(uri) == f"{uri}/checkpoint-2"
    assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-4")


def test_a_process_on_another_node_uploads_its_own_rng_state_at_once(
    hf: ModuleType, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/ckpt/run-1"
    folder = tmp_path / "checkpoint-2"  # what rank 2 (node 1's local rank 0) has on its own disk
    folder.mkdir()
    (folder / "rng_state_2.pth").write_bytes(b"rank 2")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    mirror = checkpoint_sync.CheckpointMirror(uri)
    mirror.on_save(SimpleNamespace(output_dir=str(tmp_path)),
                   hf.TrainerState(global_step=2, is_world_process_zero=False), hf.TrainerControl())
    assert storage.list_files(f"{uri}/checkpoint-2") == {"rng_state_2.pth": 6}  # before on_save returns
    assert latest_complete_checkpoint(uri) is None  # rank 0's trainer_state.json completes it


def test_rank_0_does_not_complete_a_checkpoint_another_node_could_not_upload(
    hf: ModuleType, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from job.train import distributed

    uri = f"s3://{s3_bucket}/ckpt/run-1"
    _checkpoint(tmp_path, 2)
    monkeypatch.setattr(distributed, "any_rank", lambda flag: True)  # a process on node 1 reported a failure
    mirror = checkpoint_sync.CheckpointMirror(uri)
    mirror.on_save(SimpleNamespace(output_dir=str(tmp_path)), hf.TrainerState(global_step=2), hf.TrainerControl())
    with pytest.raises(JobError, match="checkpoint-2: a process on another node could not upload its RNG state"):
        mirror.wait()
    assert storage.list_files(uri) == {} and latest_complete_checkpoint(uri) is None
