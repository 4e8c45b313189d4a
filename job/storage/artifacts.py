"""Finding published runs and pulling one down with every file checked against its manifest."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from job.errors import JobError, MissingInputError
from job.storage import objects as storage
from job.storage.publish import MANIFEST, read_manifest, same_run

logger = logging.getLogger(__name__)

PARTIAL_MANIFEST = ".manifest.json.partial"
"""Written into a pull's destination first, so an interrupted pull of the same run can be resumed."""


def list_runs(uri: str) -> list[dict[str, Any]]:
    """Every run folder under `uri`, by name: run_id, uri, complete (manifest present), status, metrics,
    started_at, ended_at (None/{} for incomplete runs)."""
    runs = []
    for name in storage.list_dirs(uri):
        run_uri = storage.join(uri, name)
        manifest = read_manifest(storage.join(run_uri, MANIFEST))
        info = manifest or {}
        runs.append({
            "run_id": name,
            "uri": run_uri,
            "complete": manifest is not None,
            "status": info.get("status"),
            "metrics": info.get("metrics") or {},
            "started_at": info.get("started_at"),
            "ended_at": info.get("ended_at"),
        })
    return runs


def pull_run(run_uri: str, dest: Path) -> Path:
    """Download the run at `run_uri` into `dest`, verifying each file's sha256 against the manifest, which is
    written last. Refuses an incomplete run, and a non-empty `dest` unless it holds (part of) the same run,
    in which case only missing or differing files are fetched. Returns `dest`."""
    run_uri = run_uri.rstrip("/")
    manifest = read_manifest(storage.join(run_uri, MANIFEST))
    if manifest is None:
        if storage.exists(run_uri):
            raise MissingInputError(
                f"{run_uri}: incomplete run (no {MANIFEST}): still being published, or its publish failed"
            )
        raise MissingInputError(f"{run_uri}: no run here")
    if not isinstance(manifest.get("files"), list):
        raise JobError(f"{storage.join(run_uri, MANIFEST)}: not a run manifest")
    _check_dest(dest, manifest)
    dest.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(dest / PARTIAL_MANIFEST), manifest)

    expected = {entry["path"]: entry for entry in manifest["files"]}
    todo = [rel for rel, entry in expected.items() if not _verified(dest / rel, entry)]
    if todo:
        storage.download_dir(run_uri, dest, files=todo)
    for rel in todo:
        path = dest / rel
        actual = storage.sha256_file(path)
        if actual != expected[rel]["sha256"]:
            path.unlink()
            want = expected[rel]["sha256"]
            raise JobError(
                f"{storage.join(run_uri, rel)}: checksum mismatch (manifest sha256 {want[:16]}…, downloaded "
                f"{actual[:16]}…); the stored copy is corrupt"
            )
    shutil.move(dest / PARTIAL_MANIFEST, dest / MANIFEST)
    logger.info("pulled run %s into %s (%d files downloaded, %d already there)", manifest.get("run_id"), dest,
                len(todo), len(expected) - len(todo))
    return dest


def _verified(path: Path, entry: dict[str, Any]) -> bool:
    if not path.is_file() or path.stat().st_size != entry["size"]:
        return False
    return storage.sha256_file(path) == entry["sha256"]


def _check_dest(dest: Path, manifest: dict[str, Any]) -> None:
    """`dest` must be absent, empty, or hold the same run (a finished or interrupted pull of it)."""
    if dest.exists() and not dest.is_dir():
        raise JobError(f"{dest}: exists and is not a folder")
    if not dest.exists() or not any(dest.iterdir()):
        return
    for name in (MANIFEST, PARTIAL_MANIFEST):
        held = read_manifest(str(dest / name))
        if held and same_run(held, manifest):
            return
    raise JobError(
        f"{dest}: not empty and does not hold run {manifest.get('run_id')!r}; refusing to overwrite it "
        "(choose an empty or new folder)"
    )
