"""job.storage.objects against a real S3 HTTP server on 127.0.0.1 (moto), and against local folders."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.core.authorization import enable_iam_authentication
from s3_fixtures import ACCESS_KEY, REGION, SECRET_KEY, use_endpoint

from job.errors import ConfigError, MissingInputError
from job.storage import objects as storage

MiB = 1024 * 1024


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _no_secret(message: str) -> None:
    assert SECRET_KEY not in message and ACCESS_KEY not in message
    assert "Signature=" not in message and "X-Amz-" not in message


def test_uri_helpers() -> None:
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x")
    assert storage.split_s3("s3://b/a/b.txt") == ("b", "a/b.txt")
    assert storage.split_s3("s3://b") == ("b", "")
    assert storage.join("s3://b/runs/", "r1", "manifest.json") == "s3://b/runs/r1/manifest.json"
    assert storage.join("s3://b", "x") == "s3://b/x"
    assert storage.join("file:///tmp/runs", "r1") == "/tmp/runs/r1"
    assert storage.local_path("file:///tmp/a%20b") == Path("/tmp/a b")
    with pytest.raises(ConfigError):
        storage.split_s3("s3:///key")


def test_local_roundtrip(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", {"a.txt": b"a", "sub/b.bin": b"bb"})
    dest_uri = f"file://{tmp_path}/dest"
    assert storage.upload_dir(src, dest_uri, last="a.txt") == ["sub/b.bin", "a.txt"]
    assert storage.list_files(dest_uri) == {"a.txt": 1, "sub/b.bin": 2}
    assert storage.list_dirs(dest_uri) == ["sub"]
    assert storage.exists(storage.join(dest_uri, "sub")) and not storage.exists(storage.join(dest_uri, "zz"))
    storage.write_json(storage.join(dest_uri, "x.json"), {"k": 1})
    assert storage.read_json(storage.join(dest_uri, "x.json")) == {"k": 1}
    assert storage.download_dir(dest_uri, tmp_path / "back") == ["a.txt", "sub/b.bin", "x.json"]
    assert storage.fetch_to_cache(str(src), tmp_path / "cache") == src
    with pytest.raises(storage.NotFound, match="no such"):
        storage.read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(storage.NotFound):
        storage.list_dirs(str(tmp_path / "missing"))


def test_upload_list_download_roundtrip(s3_bucket: str, tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", {"a.txt": b"alpha", "sub/b.bin": b"\x00" * 100, "sub/deep/c.json": b"{}"})
    uri = f"s3://{s3_bucket}/prefix/run"
    assert storage.upload_dir(src, uri) == ["a.txt", "sub/b.bin", "sub/deep/c.json"]
    assert storage.list_files(uri) == {"a.txt": 5, "sub/b.bin": 100, "sub/deep/c.json": 2}
    assert storage.list_dirs(uri) == ["sub"]
    assert storage.list_dirs(f"s3://{s3_bucket}") == ["prefix"]
    assert storage.list_dirs(f"s3://{s3_bucket}/nothing-here") == []
    assert storage.exists(f"{uri}/a.txt") and storage.exists(f"{uri}/sub") and storage.exists(uri)
    assert not storage.exists(f"{uri}/nope") and not storage.exists(f"{uri}/su")

    storage.write_json(f"{uri}/meta.json", {"ok": True})
    assert storage.read_json(f"{uri}/meta.json") == {"ok": True}
    storage.remove(f"{uri}/meta.json")
    assert not storage.exists(f"{uri}/meta.json")

    back = tmp_path / "back"
    assert storage.download_dir(uri, back) == ["a.txt", "sub/b.bin", "sub/deep/c.json"]
    assert (back / "sub/deep/c.json").read_bytes() == b"{}"
    assert storage.download_file(f"{uri}/a.txt", tmp_path / "one" / "a.txt").read_bytes() == b"alpha"
    storage.upload_file(src / "a.txt", f"s3://{s3_bucket}/single/renamed.txt")
    assert storage.read_text(f"s3://{s3_bucket}/single/renamed.txt") == "alpha"

    # Repeating an upload sends only what changed (size and recorded sha256 are compared).
    assert storage.upload_dir(src, uri) == []
    (src / "a.txt").write_bytes(b"ALPHA")  # same size, new content
    assert storage.upload_dir(src, uri) == ["a.txt"]
    assert storage.read_text(f"{uri}/a.txt") == "ALPHA"


def test_fetch_to_cache_prefix_downloads_only_changed(s3_bucket: str, s3_client: Any, tmp_path: Path) -> None:
    for name, body in {"train.jsonl": b"1\n", "test.jsonl": b"2\n", "more/valid.jsonl": b"3\n"}.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"data/{name}", Body=body)
    uri, cache = f"s3://{s3_bucket}/data", tmp_path / "cache"

    folder = storage.fetch_to_cache(uri, cache)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "more/valid.jsonl", "test.jsonl", "train.jsonl"]
    inodes = {p.name: p.stat().st_ino for p in folder.rglob("*.jsonl")}

    assert storage.fetch_to_cache(uri + "/", cache) == folder  # unchanged ETags: nothing downloaded
    assert {p.name: p.stat().st_ino for p in folder.rglob("*.jsonl")} == inodes

    s3_client.put_object(Bucket=s3_bucket, Key="data/test.jsonl", Body=b"changed\n")
    s3_client.delete_object(Bucket=s3_bucket, Key="data/more/valid.jsonl")
    storage.fetch_to_cache(uri, cache)
    assert (folder / "test.jsonl").read_bytes() == b"changed\n"
    assert (folder / "test.jsonl").stat().st_ino != inodes["test.jsonl"]
    assert (folder / "train.jsonl").stat().st_ino == inodes["train.jsonl"]
    assert not (folder / "more/valid.jsonl").exists()


def test_fetch_to_cache_single_object(s3_bucket: str, s3_client: Any, tmp_path: Path) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="data/rows.jsonl", Body=b"row\n")
    s3_client.put_object(Bucket=s3_bucket, Key="data/rows.jsonl.bak", Body=b"old\n")
    path = storage.fetch_to_cache(f"s3://{s3_bucket}/data/rows.jsonl", tmp_path)
    assert path.name == "rows.jsonl" and path.read_bytes() == b"row\n"
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]
    inode = path.stat().st_ino
    assert storage.fetch_to_cache(f"s3://{s3_bucket}/data/rows.jsonl", tmp_path) == path
    assert path.stat().st_ino == inode


def test_multipart_upload_with_small_threshold(
    s3_bucket: str, s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_S3_MULTIPART_THRESHOLD", str(MiB))
    monkeypatch.setenv("FINETUNE_S3_MULTIPART_CHUNKSIZE", str(5 * MiB))
    big = tmp_path / "weights.bin"
    big.write_bytes(bytes(range(256)) * (6 * MiB // 256))
    storage.upload_file(big, f"s3://{s3_bucket}/m/weights.bin")
    head = s3_client.head_object(Bucket=s3_bucket, Key="m/weights.bin")
    assert head["ETag"].strip('"').endswith("-2")  # two parts: 5 MiB + 1 MiB
    assert head["Metadata"][storage.SHA256_METADATA] == storage.sha256_file(big)
    back = storage.download_file(f"s3://{s3_bucket}/m/weights.bin", tmp_path / "back.bin")
    assert storage.sha256_file(back) == storage.sha256_file(big)


def test_missing_bucket_key_and_prefix(s3_bucket: str, tmp_path: Path) -> None:
    missing = "s3://no-such-bucket-finetune/data/train.jsonl"
    for call in (lambda: storage.read_text(missing), lambda: storage.fetch_to_cache(missing, tmp_path),
                 lambda: storage.exists(missing), lambda: storage.list_dirs("s3://no-such-bucket-finetune/x")):
        with pytest.raises(MissingInputError, match="bucket 'no-such-bucket-finetune' does not exist") as e:
            call()
        assert str(e.value).startswith("s3://no-such-bucket-finetune/")
        _no_secret(str(e.value))
    with pytest.raises(storage.NotFound, match=f"s3://{s3_bucket}/nope.txt: no such object"):
        storage.read_text(f"s3://{s3_bucket}/nope.txt")
    with pytest.raises(storage.NotFound, match="no such object or prefix"):
        storage.fetch_to_cache(f"s3://{s3_bucket}/empty/", tmp_path)
    with pytest.raises(storage.NotFound, match="no objects under this prefix"):
        storage.download_dir(f"s3://{s3_bucket}/empty", tmp_path / "d")
    with pytest.raises(storage.NotFound, match="no such object"):
        storage.download_file(f"s3://{s3_bucket}/nope.bin", tmp_path / "nope.bin")


def test_bad_credentials_are_named_without_secrets(
    s3_env: str, s3_bucket: str, s3_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="data/train.jsonl", Body=b"x")
    iam = boto3.client("iam", endpoint_url=s3_env, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                       aws_secret_access_key=SECRET_KEY)
    iam.create_user(UserName=f"nobody-{s3_bucket}")
    key = iam.create_access_key(UserName=f"nobody-{s3_bucket}")["AccessKey"]  # no policy: may do nothing
    uri = f"s3://{s3_bucket}/data/train.jsonl"
    cases = {
        (ACCESS_KEY, SECRET_KEY): "access key id unknown",
        (key["AccessKeyId"], "wrong-secret-value-123"): "signature rejected",
        (key["AccessKeyId"], key["SecretAccessKey"]): "access denied",
    }
    with enable_iam_authentication():
        for (key_id, secret), expected in cases.items():
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            for call in (lambda: storage.read_text(uri), lambda: storage.fetch_to_cache(uri, tmp_path)):
                with pytest.raises(MissingInputError, match=expected) as info:
                    call()
                message = str(info.value)
                assert message.startswith(uri) and "\n" not in message
                assert key_id not in message and secret not in message
                _no_secret(message)


def test_no_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(MissingInputError, match=f"s3://{s3_bucket}/x: no usable AWS credentials"):
        storage.read_text(f"s3://{s3_bucket}/x")


def test_unreachable_endpoint_fails_fast(s3_env: str, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    use_endpoint(monkeypatch, "http://127.0.0.1:1")
    monkeypatch.setenv("FINETUNE_S3_CONNECT_TIMEOUT", "0.5")
    start = time.monotonic()
    expected = r"s3://b/data: cannot reach the S3 endpoint http://127\.0\.0\.1:1 "
    with pytest.raises(MissingInputError, match=expected) as info:
        storage.fetch_to_cache("s3://b/data", tmp_path)
    assert time.monotonic() - start < 10
    _no_secret(str(info.value))


def test_bad_setting_is_a_config_error(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_S3_MULTIPART_THRESHOLD", "lots")
    with pytest.raises(ConfigError, match="FINETUNE_S3_MULTIPART_THRESHOLD='lots'"):
        storage.transfer_config()
