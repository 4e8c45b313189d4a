"""Finding published runs and pulling one down with every file checked against its manifest.

A pull fetches the published run (adapter, reports, logs, data, config); the trainer checkpoints, which carry
optimizer state, only with `with_checkpoints`. It also understands a SageMaker training job's output: the
`model.tar.gz` that SageMaker made of /opt/ml/model, which holds the run folder.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from job.errors import ConfigError, CorruptInputError, MissingInputError
from job.storage import objects as storage
from job.storage.publish import (
    CHECKPOINTS_DIR,
    MANIFEST,
    checkpoints_location,
    read_checked_manifest,
    read_manifest,
    same_run,
)

logger = logging.getLogger(__name__)

PARTIAL_MANIFEST = ".manifest.json.partial"
"""Written into a pull's destination first, so an interrupted pull of the same run can be resumed."""


def list_runs(uri: str) -> list[dict[str, Any]]:
    """Every run folder under `uri`, by name: run_id, uri, complete (a manifest that checks out), problem (why
    its manifest does not, else None), status, metrics, started_at, ended_at (None/{} unless complete)."""
    runs = []
    for name in storage.list_dirs(uri):
        run_uri = storage.join(uri, name)
        problem = None
        try:
            manifest = read_checked_manifest(storage.join(run_uri, MANIFEST))
        except CorruptInputError as exc:
            manifest, problem = None, str(exc)
        info = manifest or {}
        runs.append({
            "run_id": name,
            "uri": run_uri,
            "complete": manifest is not None,
            "problem": problem,
            "status": _text(info.get("status")),
            "metrics": info.get("metrics") if isinstance(info.get("metrics"), dict) else {},
            "started_at": _text(info.get("started_at")),
            "ended_at": _text(info.get("ended_at")),
        })
    return runs


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


SAGEMAKER_ARCHIVE = "model.tar.gz"


def pull_run(
    run_uri: str, dest: Path, *, with_checkpoints: bool = False, checkpoints_from: str | None = None
) -> Path:
    """Download the run at `run_uri` into `dest`, verifying each file's sha256 against the manifest, which is
    written last. With `with_checkpoints`, also the checkpoints the manifest lists, into `dest/checkpoints/`:
    from inside the run, or from `checkpoints_from` (the user's word for a location outside it).
    Refuses an incomplete run, a manifest that does not check out (`check_manifest`), and a non-empty `dest`
    unless it holds (part of) the same run, in which case only missing or differing files are fetched.
    `run_uri` may also be a SageMaker `model.tar.gz` (or the training job's output folder holding it).
    Returns `dest`."""
    run_uri = run_uri.rstrip("/") or run_uri
    if run_uri.endswith(".tar.gz") or (
        not storage.exists(storage.join(run_uri, MANIFEST)) and storage.exists(storage.join(run_uri, SAGEMAKER_ARCHIVE))
    ):
        archive = run_uri if run_uri.endswith(".tar.gz") else storage.join(run_uri, SAGEMAKER_ARCHIVE)
        return _pull_archive(archive, dest, with_checkpoints=with_checkpoints, checkpoints_from=checkpoints_from)
    manifest = read_checked_manifest(storage.join(run_uri, MANIFEST))
    if manifest is None:
        if storage.exists(run_uri):
            raise MissingInputError(
                f"{run_uri}: incomplete run (no {MANIFEST}): still being published, or its publish failed"
            )
        raise MissingInputError(f"{run_uri}: no run here")
    checkpoints = _checkpoints_source(run_uri, manifest, checkpoints_from) if with_checkpoints else None
    _check_dest(dest, manifest)
    dest.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(dest / PARTIAL_MANIFEST), manifest)

    fetched = _fetch_verified(run_uri, dest, manifest["files"])
    if checkpoints:
        fetched += _fetch_checkpoints(checkpoints, dest, manifest)
    shutil.move(dest / PARTIAL_MANIFEST, dest / MANIFEST)
    logger.info("pulled run %s into %s (%d files downloaded)", manifest.get("run_id"), dest, fetched)
    return dest


def _fetch_verified(src_uri: str, dest: Path, entries: list[dict[str, Any]]) -> int:
    """Download the entries (path, size, sha256) from folder `src_uri` that `dest` lacks; check every sha256."""
    expected = {entry["path"]: entry for entry in entries}
    targets = {rel: storage.safe_path(dest, rel, str(dest)) for rel in expected}
    todo = [rel for rel, entry in expected.items() if not _verified(targets[rel], entry)]
    if todo:
        storage.download_dir(src_uri, dest, files=todo)
    for rel in todo:
        path = targets[rel]
        actual = storage.sha256_file(path)
        if actual != expected[rel]["sha256"]:
            path.unlink()
            want = expected[rel]["sha256"]
            raise CorruptInputError(
                f"{storage.join(src_uri, rel)}: checksum mismatch (manifest sha256 {want[:16]}…, downloaded "
                f"{actual[:16]}…); the stored copy is corrupt"
            )
    return len(todo)


def _checkpoints_source(run_uri: str, manifest: dict[str, Any], checkpoints_from: str | None) -> str:
    """Where to fetch the manifest's checkpoints from: inside the run, or where the user says."""
    if not (manifest.get("checkpoints") or {}).get("files"):
        raise MissingInputError(f"{run_uri}: the manifest lists no checkpoints to pull")
    if checkpoints_from:
        return checkpoints_from.rstrip("/") or checkpoints_from
    source = checkpoints_location(run_uri, manifest)
    if source is None:
        raise CorruptInputError(
            f"{storage.join(run_uri, MANIFEST)}: its checkpoints.uri {manifest['checkpoints']['uri']!r} is outside "
            "the run; refusing to fetch from there (pass --checkpoints-from URI if that is where they are)"
        )
    return source


def _fetch_checkpoints(source: str, dest: Path, manifest: dict[str, Any]) -> int:
    checkpoints = manifest["checkpoints"]
    try:
        return _fetch_verified(source, dest / CHECKPOINTS_DIR, checkpoints["files"])
    except storage.NotFound as exc:
        raise MissingInputError(f"checkpoints of run {manifest.get('run_id')!r} are gone from {source} ({exc})"
                                ) from None


def _pull_archive(archive_uri: str, dest: Path, *, with_checkpoints: bool, checkpoints_from: str | None) -> Path:
    """A SageMaker model.tar.gz: download, unpack safely into a temporary folder, and pull the run folder inside
    it (the one holding manifest.json) into `dest` with the same checks as a bucket pull."""
    with tempfile.TemporaryDirectory(prefix="finetune-pull-") as tmp:
        local = storage.download_file(archive_uri, Path(tmp) / SAGEMAKER_ARCHIVE) if storage.is_remote(
            archive_uri) else storage.local_path(archive_uri)
        if not local.is_file():
            raise MissingInputError(f"{archive_uri}: no such archive")
        unpacked = Path(tmp) / "unpacked"
        try:
            with tarfile.open(local, "r:gz") as tar:
                tar.extractall(unpacked, filter="data")  # refuses absolute paths, '..', devices, outside links
        except (tarfile.TarError, OSError) as exc:
            raise CorruptInputError(f"{archive_uri}: cannot unpack ({type(exc).__name__}: {exc})") from None
        runs = sorted(path.parent for path in unpacked.rglob(MANIFEST))
        if len(runs) != 1:
            raise MissingInputError(f"{archive_uri}: expected one run (one {MANIFEST}) inside, found {len(runs)}")
        return pull_run(str(runs[0]), dest, with_checkpoints=with_checkpoints, checkpoints_from=checkpoints_from)


def _verified(path: Path, entry: dict[str, Any]) -> bool:
    if not path.is_file() or path.stat().st_size != entry["size"]:
        return False
    return storage.sha256_file(path) == entry["sha256"]


def _check_dest(dest: Path, manifest: dict[str, Any]) -> None:
    """`dest` must be absent, empty, or hold the same run (a finished or interrupted pull of it)."""
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{dest}: exists and is not a folder")
    if not dest.exists() or not any(dest.iterdir()):
        return
    for name in (MANIFEST, PARTIAL_MANIFEST):
        held = read_manifest(str(dest / name))
        if held and same_run(held, manifest):
            return
    raise ConfigError(
        f"{dest}: not empty and does not hold run {manifest.get('run_id')!r}; refusing to overwrite it "
        "(choose an empty or new folder)"
    )
