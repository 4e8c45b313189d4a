"""Push and pull trust no manifest: every path it names must be relative, normalized and inside the run, through
no symbolic link, with a well-formed entry; anything else is one line, exit 3, and nothing is read or written
outside the run or the destination. `artifacts ls` calls a garbage manifest corrupt, never complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from after_fixtures import one_line_error
from cli_runner import run_cli
from s3_fixtures import make_run_folder

from job.errors import EXIT_MISSING_INPUT, CorruptInputError
from job.settings import MANIFEST
from job.storage import objects as storage
from job.storage.publish import build_manifest

SECRET = b"aws_secret_access_key = not-for-the-bucket\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _entry(path: str, data: bytes = SECRET) -> dict[str, Any]:
    import hashlib

    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _run(root: Path, run_id: str = "run-1") -> tuple[Path, dict[str, Any]]:
    run = make_run_folder(root, run_id)
    manifest = build_manifest(run, config={"run": run_id}, status="completed", started_at="2025-01-01T00:00:00Z",
                              ended_at="2025-01-01T01:00:00Z", metrics={"execution_accuracy": 0.5})
    (run / MANIFEST).write_text(json.dumps(manifest))
    return run, manifest


def _keys(s3_client, bucket: str) -> list[str]:
    return [obj["Key"] for obj in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def _hostile_files(secret: Path) -> dict[str, Any]:
    return {
        "absolute": _entry(str(secret)),
        "dotdot": _entry("../outside/secret.txt"),
        "inner dotdot": _entry("adapter/../../outside/secret.txt"),
        "double slash": _entry("adapter//x"),
        "string entry": "adapter/adapter_config.json",
        "no sha256": {"path": "config.yaml", "size": 3},
        "sha256 not hex": {**_entry("config.yaml"), "sha256": 12},
        "size not int": {**_entry("config.yaml"), "size": "3"},
        "manifest itself": _entry(MANIFEST),
    }


@pytest.mark.parametrize("case", list(_hostile_files(Path("/x"))))
@pytest.mark.parametrize("remote", [True, False], ids=["to-s3", "to-local"])
def test_push_refuses_a_manifest_naming_files_outside_the_run(capsys, tmp_path, secret, case, remote, s3_bucket,
                                                               s3_client):
    run, manifest = _run(tmp_path / "stage")
    manifest["files"].append(_hostile_files(secret)[case])
    (run / MANIFEST).write_text(json.dumps(manifest))
    dest = f"s3://{s3_bucket}/runs/run-1" if remote else str(tmp_path / "published" / "run-1")
    code, out, err = run_cli(capsys, "artifacts", "push", str(run), dest)
    one_line_error(code, err, EXIT_MISSING_INPUT, "manifest.json")
    assert out == "" and _keys(s3_client, s3_bucket) == [] and not (tmp_path / "published").exists()


@pytest.mark.parametrize("link", ["file", "folder"])
def test_push_never_follows_a_symbolic_link(capsys, tmp_path, secret, link, s3_bucket, s3_client):
    run, manifest = _run(tmp_path / "stage")
    if link == "file":
        os.symlink(secret, run / "adapter" / "notes.txt")
        manifest["files"].append(_entry("adapter/notes.txt"))
    else:
        os.symlink(secret.parent, run / "extra")
        manifest["files"].append(_entry("extra/secret.txt"))
    (run / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "artifacts", "push", str(run), f"s3://{s3_bucket}/runs/run-1")
    one_line_error(code, err, EXIT_MISSING_INPUT, "is a symbolic link; links are not followed")
    assert _keys(s3_client, s3_bucket) == []
    with pytest.raises(CorruptInputError, match="a symbolic link inside"):  # nor does building a manifest
        build_manifest(run, config={}, status="completed", started_at="", ended_at="", metrics=None)


@pytest.mark.parametrize("case", ["absolute", "dotdot", "inner dotdot", "string entry", "no sha256"])
def test_pull_from_s3_refuses_a_manifest_naming_files_outside_dest(capsys, tmp_path, secret, case, s3_bucket,
                                                                    s3_client):
    run, manifest = _run(tmp_path / "stage")
    storage.upload_dir(run, f"s3://{s3_bucket}/runs/run-1")
    manifest["files"].append(_hostile_files(secret)[case])
    s3_client.put_object(Bucket=s3_bucket, Key="runs/run-1/manifest.json", Body=json.dumps(manifest).encode())
    before = secret.stat()
    dest = tmp_path / "pulled"
    code, out, err = run_cli(capsys, "artifacts", "pull", f"s3://{s3_bucket}/runs/run-1", str(dest))
    one_line_error(code, err, EXIT_MISSING_INPUT, f"s3://{s3_bucket}/runs/run-1/manifest.json")
    assert "verified" not in out and not dest.exists()  # checked before anything is written
    assert secret.read_bytes() == SECRET and secret.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "stage"]


def test_pull_from_a_local_run_refuses_a_symlink_and_a_dotdot(capsys, tmp_path, secret):
    run, manifest = _run(tmp_path / "published")
    os.symlink(secret, run / "eval" / "leak.txt")
    (run / MANIFEST).write_text(json.dumps({**manifest, "files": [*manifest["files"], _entry("eval/leak.txt")]}))
    code, _, err = run_cli(capsys, "artifacts", "pull", str(run), str(tmp_path / "pulled"))
    one_line_error(code, err, EXIT_MISSING_INPUT, "is a symbolic link")
    (run / MANIFEST).write_text(json.dumps({**manifest, "files": [*manifest["files"], _entry("../outside/x")]}))
    code, _, err = run_cli(capsys, "artifacts", "pull", str(run), str(tmp_path / "pulled"))
    one_line_error(code, err, EXIT_MISSING_INPUT, "unsafe file name '../outside/x'")
    assert not (tmp_path / "pulled" / MANIFEST).exists() and secret.read_bytes() == SECRET


def test_a_bucket_key_that_climbs_out_is_never_written(tmp_path, s3_bucket, s3_client):
    s3_client.put_object(Bucket=s3_bucket, Key="data/rows.jsonl", Body=b"{}\n")
    s3_client.put_object(Bucket=s3_bucket, Key="data/../../escape.txt", Body=b"gotcha")
    s3_client.put_object(Bucket=s3_bucket, Key="data//abs.txt", Body=b"gotcha")
    dest = tmp_path / "a" / "dest"
    with pytest.raises(CorruptInputError, match="unsafe file name"):
        storage.download_dir(f"s3://{s3_bucket}/data", dest)
    assert not any(p.name in ("escape.txt", "abs.txt") for p in tmp_path.rglob("*"))


def test_pull_with_checkpoints_never_follows_a_checkpoints_uri_outside_the_run(capsys, tmp_path, secret):
    run, manifest = _run(tmp_path / "published")
    manifest["checkpoints"] = {"uri": str(secret.parent), "files": [_entry("secret.txt")]}
    (run / MANIFEST).write_text(json.dumps(manifest))
    dest = tmp_path / "pulled"
    code, _, err = run_cli(capsys, "artifacts", "pull", str(run), str(dest), "--with-checkpoints")
    one_line_error(code, err, EXIT_MISSING_INPUT, "is outside the run; refusing to fetch from there")
    assert not dest.exists()

    # the user may vouch for a location outside the run (a training.checkpoint_uri elsewhere): checked all the same
    code, out, err = run_cli(capsys, "artifacts", "pull", str(run), str(dest), "--with-checkpoints",
                             "--checkpoints-from", str(secret.parent))
    assert code == 0, err
    assert out == f"pulled and verified {dest}\n"
    assert (dest / "checkpoints" / "secret.txt").read_bytes() == SECRET and (dest / MANIFEST).is_file()


def test_pull_with_checkpoints_uses_a_checkpoints_uri_inside_the_run(tmp_path, s3_bucket):
    from job.storage.artifacts import pull_run

    run, manifest = _run(tmp_path / "stage")
    checkpoint = build_manifest(run, config={}, status="", started_at="", ended_at="", metrics=None)["checkpoints"]
    root = f"s3://{s3_bucket}/runs/run-1"
    manifest["checkpoints"] = {"uri": f"{root}/checkpoints", "files": checkpoint["files"]}
    storage.upload_dir(run, root, files=[*storage.list_files(str(run))])
    storage.write_json(f"{root}/{MANIFEST}", manifest)
    pulled = pull_run(root, tmp_path / "pulled", with_checkpoints=True)
    assert (pulled / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()


GARBAGE = {
    "not json": b"{not json",
    "not utf-8": b'{"files": ["\xff"]}',
    "a list": b"[]",
    "files not a list": b'{"files": {"a": 1}}',
    "string entry": b'{"files": ["config.yaml"]}',
    "no sha256": b'{"files": [{"path": "config.yaml", "size": 3}]}',
    "metrics not an object": b'{"files": [], "metrics": "lots"}',
    "nested too deeply": b"[" * 100_000,
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_a_garbage_manifest_is_one_line_exit_3_everywhere_and_corrupt_in_ls(capsys, tmp_path, case, s3_bucket,
                                                                            s3_client, lora_run):
    root = f"s3://{s3_bucket}/runs"
    good, _ = _run(tmp_path / "stage", "good")
    storage.upload_dir(good, f"{root}/good")
    s3_client.put_object(Bucket=s3_bucket, Key="runs/bad/manifest.json", Body=GARBAGE[case])
    code, out, err = run_cli(capsys, "artifacts", "ls", root)
    assert code == 0, err
    lines = dict(line.split(maxsplit=1) for line in out.splitlines())
    assert lines["good"].startswith("completed") and lines["bad"].startswith("corrupt")
    assert "complete " not in lines["bad"] and "manifest.json" in lines["bad"]

    code, out, err = run_cli(capsys, "artifacts", "pull", f"{root}/bad", str(tmp_path / "pulled"))
    one_line_error(code, err, EXIT_MISSING_INPUT, f"{root}/bad/manifest.json")
    assert not (tmp_path / "pulled").exists()

    copy = tmp_path / "copy"
    shutil.copytree(lora_run, copy)
    (copy / MANIFEST).write_bytes(GARBAGE[case])
    for args in (["compare", str(copy), "--output", str(tmp_path / "c.md")],
                 ["export", str(copy), "--output", str(tmp_path / "exported"), "--format", "vllm"],
                 ["artifacts", "push", str(copy), f"{root}/copy"]):
        code, out, err = run_cli(capsys, *args)
        one_line_error(code, err, EXIT_MISSING_INPUT, "manifest.json")
    assert not (tmp_path / "c.md").exists() and not (tmp_path / "exported").exists()
    assert not [k for k in (o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"])
                if k.startswith("runs/copy")]


def test_ls_shows_no_control_characters_from_a_listing(capsys, tmp_path, s3_bucket, s3_client):
    s3_client.put_object(Bucket=s3_bucket, Key="runs/evil\x1b[2J\u202e/manifest.json",
                         Body=json.dumps({"files": [], "status": "done\x1b[31m\n"}).encode())
    code, out, err = run_cli(capsys, "artifacts", "ls", f"s3://{s3_bucket}/runs")
    assert code == 0, err
    assert "\x1b" not in out and "\u202e" not in out and out.count("\n") == 1 and out.startswith("evil?[2J?")
