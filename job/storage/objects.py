"""One storage layer for every URI the job reads or writes: local paths, `file://` URIs and `s3://bucket/prefix`.

S3 access uses boto3's standard configuration chain (AWS_ENDPOINT_URL for MinIO/R2, AWS_PROFILE, environment
credentials, instance roles), botocore's retries for transient failures, and boto3's transfer manager for
multipart, concurrent transfers. A failure to reach or read S3 becomes a one-line `MissingInputError` naming
the URI and the problem, never a secret.

Environment (all optional):
  AWS_RETRY_MODE, AWS_MAX_ATTEMPTS   botocore retry mode (default standard) and total attempts (default 6)
  FINETUNE_S3_CONNECT_TIMEOUT        seconds to wait for a connection (default 10)
  FINETUNE_S3_READ_TIMEOUT           seconds to wait for a response (default 60)
  FINETUNE_S3_MULTIPART_THRESHOLD    bytes from which transfers are multipart (default 64 MiB)
  FINETUNE_S3_MULTIPART_CHUNKSIZE    bytes per part (default 16 MiB; S3 needs at least 5 MiB)
  FINETUNE_S3_MAX_CONCURRENCY        parallel transfer threads (default 8)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError

from job.config import destination_problem
from job.errors import ConfigError, CorruptInputError, JobError, MissingInputError

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
SHA256_METADATA = "sha256"
"""User metadata (`x-amz-meta-sha256`) with each uploaded file's sha256, so unchanged files are skipped."""
MiB = 1024 * 1024
_ENV_PREFIXES = ("AWS_", "FINETUNE_S3_")


class NotFound(MissingInputError):
    """The object, prefix or local file does not exist (bucket, credentials and endpoint are fine)."""


# URIs


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_remote(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def check_destination(uri: str, option: str, *, remote: bool = True) -> str:
    """`uri` if results can be written there: a local path, a `file://` URI or (when `remote`) s3://bucket/prefix.
    Anything else (`gs://...`, `S3://...`, `s3://` without a bucket) is a ConfigError (exit 2) before anything
    is written, never a local folder named like the URI."""
    if (problem := destination_problem(uri)) is not None:
        raise ConfigError(f"{option} {uri}: {problem}")
    if is_remote(uri) and not remote:
        raise ConfigError(f"{option} {uri}: must be a local folder")
    return uri


def check_input(uri: str, option: str) -> None:
    """The one rule for inputs the user names: a local path that does not exist is a usage error (exit 2);
    remote inputs are checked when read (missing: MissingInputError, exit 3)."""
    if is_remote(uri):
        split_s3(uri)
        return
    scheme = _SCHEME.match(uri)
    if scheme and scheme.group(0) != FILE_SCHEME:
        raise ConfigError(f"{option} {uri}: unsupported URI scheme {scheme.group(1)!r}; use a local path or s3://")
    if not local_path(uri).exists():
        raise ConfigError(f"{option} {uri}: no such file or folder")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    if not is_remote(uri) or not bucket:
        raise ConfigError(f"{uri}: expected s3://bucket/key")
    return bucket, key


def local_path(uri: str) -> Path:
    """A local path or `file://` URI as a Path."""
    return Path(unquote(uri.removeprefix(FILE_SCHEME)) if uri.startswith(FILE_SCHEME) else uri).expanduser()


def join(base: str, *parts: str) -> str:
    """`join("s3://b/runs", "r1", "manifest.json")` -> "s3://b/runs/r1/manifest.json"; local paths join."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])
    return str(local_path(base).joinpath(*parts))


def _folder_key(key: str) -> str:
    """The listing prefix of a folder key: "a/b" -> "a/b/", "" -> ""."""
    return key.strip("/") + "/" if key.strip("/") else ""


def local_input(uri: str, option: str) -> Path:
    """A local file the user names for an option that reads only local files: exit 2 for an s3:// or other URI
    and for a path that is not a file."""
    if is_remote(uri) or (_SCHEME.match(uri) and not uri.startswith(FILE_SCHEME)):
        raise ConfigError(f"{option} {uri}: must be a local file")
    path = local_path(uri)
    if not path.is_file():
        raise ConfigError(f"{option} {uri}: no such file")
    return path


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def checked_name(rel: object, where: str) -> str:
    """`rel` if it names a file inside a folder: a relative, normalized POSIX path (no `..`, `.`, empty or
    absolute parts, no backslashes or control characters). The one name check for every path that a manifest,
    a listing or an archive supplies, local and S3, both ways; else CorruptInputError naming `where`."""
    problem = None
    if not isinstance(rel, str) or not rel:
        problem = "not a non-empty string"
    elif rel.startswith("/") or PurePosixPath(rel).as_posix() != rel or rel == ".":
        problem = "not a normalized relative path"
    elif ".." in PurePosixPath(rel).parts:
        problem = "leaves its folder (..)"
    elif "\\" in rel or _CONTROL.search(rel):
        problem = "holds a backslash or a control character"
    if problem:
        raise CorruptInputError(f"{where}: unsafe file name {rel!r} ({problem}); refusing it")
    return rel


def safe_path(root: Path, rel: str, where: str) -> Path:
    """root/rel for a `checked_name`, refusing a path that goes through a symbolic link below `root` (a link
    would read or write outside it)."""
    path = root
    for part in PurePosixPath(checked_name(rel, where)).parts:
        path = path / part
        if path.is_symlink():
            raise CorruptInputError(f"{where}: {path} is a symbolic link; links are not followed")
    return path


def _safe_join(root: Path, rel: str) -> Path:
    return safe_path(root, rel, str(root))


def inside(base: str, uri: str) -> str | None:
    """The path of `uri` relative to folder `base` when it lies inside it (both local, or both s3://), else None."""
    if is_remote(base) != is_remote(uri):
        return None
    if is_remote(base):
        prefix = base.rstrip("/") + "/"
        rel = uri.rstrip("/")[len(prefix):] if uri.rstrip("/").startswith(prefix) else None
    else:
        root, target = (os.path.normpath(os.path.abspath(local_path(u))) for u in (base, uri))
        rel = Path(os.path.relpath(target, root)).as_posix() if target.startswith(root.rstrip("/") + "/") else None
    try:
        return checked_name(rel, uri) if rel else None
    except CorruptInputError:
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(4 * MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def _walk(root: Path) -> list[str]:
    """Every file under root as sorted POSIX relative paths; a symbolic link below root is refused, never
    followed (it could point anywhere)."""
    files = []
    for folder, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            if (Path(folder) / name).is_symlink():
                raise CorruptInputError(f"{Path(folder) / name}: a symbolic link inside {root}; links are not "
                                        "followed (replace it with the file it points to)")
        files += [(Path(folder) / name).relative_to(root).as_posix() for name in names]
    return sorted(files)


# client


def _env_number(env: Mapping[str, str], name: str, default: float, kind: type = int) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: expected a positive {kind.__name__}")
    return value


def client() -> Any:
    """The S3 client for this environment (cached; rebuilt when AWS_*/FINETUNE_S3_* variables change)."""
    return _client(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))))


@functools.lru_cache(maxsize=4)
def _client(env_items: tuple[tuple[str, str], ...]) -> Any:
    env = dict(env_items)
    config = Config(
        retries={
            "mode": env.get("AWS_RETRY_MODE", "standard"),
            "total_max_attempts": _env_number(env, "AWS_MAX_ATTEMPTS", 6),
        },
        connect_timeout=_env_number(env, "FINETUNE_S3_CONNECT_TIMEOUT", 10.0, float),
        read_timeout=_env_number(env, "FINETUNE_S3_READ_TIMEOUT", 60.0, float),
        max_pool_connections=_env_number(env, "FINETUNE_S3_MAX_CONCURRENCY", 8) + 2,
    )
    return boto3.session.Session().client("s3", config=config)


def transfer_config() -> TransferConfig:
    env = os.environ
    return TransferConfig(
        multipart_threshold=_env_number(env, "FINETUNE_S3_MULTIPART_THRESHOLD", 64 * MiB),
        multipart_chunksize=_env_number(env, "FINETUNE_S3_MULTIPART_CHUNKSIZE", 16 * MiB),
        max_concurrency=_env_number(env, "FINETUNE_S3_MAX_CONCURRENCY", 8),
    )


# errors


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and _code(exc) in {"404", "NoSuchKey", "NotFound"}


def _endpoint() -> str:
    """The endpoint in use, without any user:password part."""
    try:
        parts = urlsplit(client().meta.endpoint_url)
    except Exception:
        return "(endpoint unknown)"
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _problem(exc: BaseException, uri: str) -> JobError:
    """One line for an S3 failure: the URI and what is wrong, never keys, signatures or signed URLs."""
    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        exc = exc.last_exception
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code == "NoSuchBucket":
            return MissingInputError(f"{uri}: bucket {split_s3(uri)[0]!r} does not exist")
        if _is_not_found(exc):
            return NotFound(f"{uri}: no such object")
        if code in {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}:
            return MissingInputError(f"{uri}: access denied (the credentials lack permission for it)")
        if code == "InvalidAccessKeyId":
            return MissingInputError(f"{uri}: access key id unknown to {_endpoint()} (check credentials)")
        if code == "SignatureDoesNotMatch":
            return MissingInputError(f"{uri}: request signature rejected (wrong secret access key)")
        if code in {"ExpiredToken", "InvalidToken", "TokenRefreshRequired", "ExpiredTokenException"}:
            return MissingInputError(f"{uri}: the session token is expired or invalid")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return JobError(f"{uri}: S3 {exc.operation_name} failed ({code or 'HTTP'} {status})")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return MissingInputError(
            f"{uri}: no usable AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
            "or run with an instance/pod role)"
        )
    if isinstance(exc, ProfileNotFound):
        return MissingInputError(f"{uri}: AWS profile {exc.kwargs.get('profile')!r} not found")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return MissingInputError(f"{uri}: cannot reach the S3 endpoint {_endpoint()} ({type(exc).__name__})")
    if isinstance(exc, BotoCoreError):
        return JobError(f"{uri}: S3 request failed ({type(exc).__name__})")
    return JobError(f"{uri}: {type(exc).__name__}: {exc}")


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except (BotoCoreError, ClientError, RetriesExceededError) as exc:
        raise _problem(exc, uri) from None


def _head(uri: str) -> dict[str, Any] | None:
    """The object's HEAD response, or None if it does not exist. A bodiless 400/403 is asked again as a LIST,
    whose error body says exactly what is wrong (unknown key id, bad signature, missing bucket...)."""
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        try:
            return client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            if _code(exc) in {"400", "403"}:
                client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            raise


# queries


def exists(uri: str) -> bool:
    """True when `uri` is a file or folder: an object, or a prefix holding objects."""
    if not is_remote(uri):
        return local_path(uri).exists()
    bucket, key = split_s3(uri)
    if key and not key.endswith("/") and _head(uri) is not None:
        return True
    with _s3_errors(uri):
        listing = client().list_objects_v2(Bucket=bucket, Prefix=_folder_key(key), MaxKeys=1)
    return listing.get("KeyCount", 0) > 0


def list_dirs(uri: str) -> list[str]:
    """Sorted names of the immediate subfolders of `uri`: [] for an empty S3 prefix, NotFound for a missing
    local folder."""
    if not is_remote(uri):
        path = local_path(uri)
        if not path.is_dir():
            raise NotFound(f"{uri}: no such folder")
        return sorted(p.name for p in path.iterdir() if p.is_dir())
    bucket, key = split_s3(uri)
    prefix = _folder_key(key)
    names: list[str] = []
    with _s3_errors(uri):
        paginator = client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(n for n in names if n)


def _list_objects(uri: str) -> dict[str, dict[str, Any]]:
    """Objects under folder `uri`: relative path -> listing entry (Size, ETag...); folder markers skipped."""
    bucket, key = split_s3(uri)
    prefix = _folder_key(key)
    found: dict[str, dict[str, Any]] = {}
    with _s3_errors(uri):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    found[obj["Key"][len(prefix) :]] = obj
    return found


def list_files(uri: str) -> dict[str, int]:
    """Every file under folder `uri`, recursively: relative POSIX path -> size in bytes."""
    if not is_remote(uri):
        root = local_path(uri)
        return {rel: (root / rel).stat().st_size for rel in _walk(root)} if root.is_dir() else {}
    return {rel: obj["Size"] for rel, obj in _list_objects(uri).items()}


# small objects


def read_text(uri: str) -> str:
    """The whole file/object as UTF-8 text; NotFound if it does not exist."""
    if not is_remote(uri):
        path = local_path(uri)
        if not path.is_file():
            raise NotFound(f"{uri}: no such file")
        data = path.read_bytes()
    else:
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            data = client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return decode_utf8(data, uri)


def decode_utf8(data: bytes, where: str) -> str:
    """`data` as UTF-8 text, else CorruptInputError naming `where`, the line and the offending byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CorruptInputError(
            f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def write_text(uri: str, text: str) -> None:
    """Write a small text file/object; local writes are atomic (temporary file, then rename)."""
    if not is_remote(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
        return
    bucket, key = split_s3(uri)
    body = text.encode("utf-8")
    with _s3_errors(uri):
        client().put_object(
            Bucket=bucket, Key=key, Body=body, Metadata={SHA256_METADATA: hashlib.sha256(body).hexdigest()}
        )


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptInputError(f"{uri}: not valid JSON (line {exc.lineno})") from None
    except RecursionError:
        raise CorruptInputError(f"{uri}: JSON nested too deeply") from None


def write_json(uri: str, data: Any) -> None:
    write_text(uri, json.dumps(data, indent=2) + "\n")


def remove(uri: str) -> None:
    """Delete one file/object if it exists."""
    if not is_remote(uri):
        local_path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        client().delete_object(Bucket=bucket, Key=key)


def remove_files(uri: str, rels: Iterable[str]) -> int:
    """Delete files (relative paths) under folder `uri`, in batches of 1000 for S3. Returns how many."""
    rels = sorted(set(rels))
    if not is_remote(uri):
        root = local_path(uri)
        for rel in rels:
            _safe_join(root, rel).unlink(missing_ok=True)
        return len(rels)
    bucket, key = split_s3(uri)
    prefix = _folder_key(key)
    with _s3_errors(uri):
        for start in range(0, len(rels), 1000):
            batch = [{"Key": prefix + rel} for rel in rels[start:start + 1000]]
            result = client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if result.get("Errors"):
                error = result["Errors"][0]
                raise JobError(f"{join(uri, error['Key'][len(prefix):])}: delete failed ({error.get('Code')}); "
                               f"{len(result['Errors'])} of {len(batch)} objects not deleted")
    return len(rels)


def remove_tree(uri: str) -> int:
    """Delete a folder / every object under a prefix (nothing if it does not exist). Returns how many files."""
    if not is_remote(uri):
        root = local_path(uri)
        count = sum(len(names) for _, _, names in os.walk(root)) if root.is_dir() else 0
        shutil.rmtree(root, ignore_errors=True)
        return count
    return remove_files(uri, _list_objects(uri))


# transfers


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def _transfer(uri: str, verb: str, jobs: Mapping[str, Any], submit: Callable[[Any, str, Any], Any]) -> None:
    """Run `submit(manager, rel, job)` for every job on one transfer manager, then raise one error naming
    every file that failed (after botocore's retries) and why. The single job of a one-file transfer has
    rel "" (`uri` is then the file)."""
    if not jobs:
        return
    failures: dict[str, BaseException] = {}
    with _s3_errors(uri), create_transfer_manager(client(), transfer_config()) as manager:
        futures = {rel: submit(manager, rel, job) for rel, job in jobs.items()}
        for rel, future in futures.items():
            try:
                future.result()
            except Exception as exc:
                failures[rel] = exc
    if not failures:
        return
    names = sorted(failures)
    if names == [""]:  # a single-file transfer: `uri` is the file
        raise _problem(failures[""], uri)
    first = _problem(failures[names[0]], join(uri, names[0]))
    reason = str(first).removeprefix(f"{join(uri, names[0])}: ")
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise type(first)(f"{uri}: {len(names)} of {len(jobs)} files did not {verb} ({shown}): {reason}")


def upload_file(src: Path, uri: str) -> None:
    """Upload (or, for a local destination, copy) one file, recording its sha256."""
    if not is_remote(uri):
        _copy(src, local_path(uri))
        return
    bucket, key = split_s3(uri)
    metadata = {SHA256_METADATA: sha256_file(src)}
    _transfer(uri, "upload", {"": src},
              lambda m, _rel, path: m.upload(str(path), bucket, key, extra_args={"Metadata": metadata}))


def upload_dir(
    src: Path,
    dest_uri: str,
    *,
    files: Iterable[str] | None = None,
    last: str | None = None,
    sha256: Mapping[str, str] | None = None,
) -> list[str]:
    """Upload `files` (relative paths; default: all under `src`) into folder `dest_uri`; `last` goes only
    after all others succeeded. Objects whose size and recorded sha256 already match are skipped, so repeating
    an upload is cheap; `sha256` passes known digests to skip hashing. Returns the relative paths uploaded."""
    rels = sorted(set(_walk(src) if files is None else files) - {last})
    order = [*rels, *([last] if last else [])]
    sources = {rel: safe_path(src, rel, str(src)) for rel in order}
    if not is_remote(dest_uri):
        dest = local_path(dest_uri)
        if dest.resolve() == src.resolve():
            return []
        for rel in order:
            _copy(sources[rel], _safe_join(dest, rel))
        return order
    digests = {rel: (sha256 or {}).get(rel) or sha256_file(sources[rel]) for rel in order}
    todo = _changed(dest_uri, src, digests)
    bucket, key = split_s3(dest_uri)

    def submit(manager: Any, rel: str, digest: str) -> Any:
        extra = {"Metadata": {SHA256_METADATA: digest}}
        return manager.upload(str(sources[rel]), bucket, _folder_key(key) + rel, extra_args=extra)

    _transfer(dest_uri, "upload", {rel: digests[rel] for rel in rels if rel in todo}, submit)
    if last and last in todo:
        _transfer(dest_uri, "upload", {last: digests[last]}, submit)
    logger.info("%s: uploaded %d of %d files (the rest were already there)", dest_uri, len(todo), len(order))
    return [rel for rel in order if rel in todo]


def _changed(dest_uri: str, src: Path, digests: Mapping[str, str]) -> set[str]:
    """Relative paths whose remote copy is missing, of another size, or recorded with another sha256."""
    remote = _list_objects(dest_uri)
    changed = set()
    for rel, digest in digests.items():
        obj = remote.get(rel)
        if obj is None or obj["Size"] != (src / rel).stat().st_size:
            changed.add(rel)
            continue
        head = _head(join(dest_uri, rel)) or {}
        if head.get("Metadata", {}).get(SHA256_METADATA) != digest:
            changed.add(rel)
    return changed


def download_file(uri: str, dest: Path) -> Path:
    """Download (or copy) one file to `dest`, replacing it atomically."""
    if not is_remote(uri):
        src = local_path(uri)
        if not src.is_file():
            raise NotFound(f"{uri}: no such file")
        _copy(src, dest)
        return dest
    bucket, key = split_s3(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _transfer(uri, "download", {"": dest}, lambda m, _rel, path: m.download(bucket, key, str(path)))
    return dest


def download_dir(src_uri: str, dest: Path, *, files: Iterable[str] | None = None) -> list[str]:
    """Download `files` (relative paths; default: every object under `src_uri`) into folder `dest`; NotFound
    when the prefix holds nothing. Returns the relative paths downloaded."""
    if not is_remote(src_uri):
        root = local_path(src_uri)
        rels = _walk(root) if files is None else sorted(files)
        if files is None and not rels:
            raise NotFound(f"{src_uri}: no such folder, or it is empty")
        for rel in rels:
            source = safe_path(root, rel, src_uri)
            if not source.is_file():
                raise NotFound(f"{join(src_uri, rel)}: no such file")
            _copy(source, _safe_join(dest, rel))
        return rels
    rels = sorted(_list_objects(src_uri) if files is None else files)
    if files is None and not rels:
        raise NotFound(f"{src_uri}: no objects under this prefix")
    _download_into(src_uri, dest, rels)
    return rels


def _download_into(src_uri: str, dest: Path, rels: Iterable[str]) -> None:
    bucket, key = split_s3(src_uri)
    targets = {rel: _safe_join(dest, rel) for rel in rels}
    for target in targets.values():
        target.parent.mkdir(parents=True, exist_ok=True)
    _transfer(src_uri, "download", targets,
              lambda m, rel, path: m.download(bucket, _folder_key(key) + rel, str(path)))


def _same_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _resolve(uri: str, name: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(folder URI, {relative path: Size/ETag}) for an object URI or a prefix URI."""
    key = split_s3(uri)[1]
    head = _head(uri) if key and not key.endswith("/") else None
    if head is not None:
        return uri.rsplit("/", 1)[0], {name: {"ETag": head["ETag"], "Size": head["ContentLength"]}}
    objects = _list_objects(uri)
    if not objects:
        raise NotFound(f"{uri}: no such object or prefix")
    return uri, objects


def fetch_to_cache(uri: str, cache_dir: Path) -> Path:
    """A local copy of an object or a prefix of objects, kept under `cache_dir` and keyed by ETag: later calls
    download only objects whose ETag changed (nothing if none did) and drop files deleted remotely.
    Returns the file (object) or folder (prefix). Local paths are returned as they are."""
    if not is_remote(uri):
        path = local_path(uri)
        if not path.exists():
            raise NotFound(f"{uri}: no such file or folder")
        return path
    bucket, key = split_s3(uri)
    name = PurePosixPath(key.rstrip("/")).name or bucket
    slot = cache_dir / f"{name}-{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:12]}"
    index = slot.with_name(f"{slot.name}.etags.json")
    source, objects = _resolve(uri, name)
    try:
        known = json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    stale = [
        rel for rel, obj in objects.items()
        if known.get(rel) != obj["ETag"] or not _same_size(slot / rel, obj["Size"])
    ]
    for rel in set(known) - set(objects):
        _safe_join(slot, rel).unlink(missing_ok=True)
    if stale:
        _download_into(source, slot, stale)
    slot.mkdir(parents=True, exist_ok=True)
    write_json(str(index), {rel: obj["ETag"] for rel, obj in sorted(objects.items())})
    logger.info("%s: downloaded %d of %d files into the cache", uri, len(stale), len(objects))
    return slot if source == uri else slot / name
