"""The run manifest, and publishing a run folder so that readers never see a manifest before its files.

A run folder `<output.uri>/<run_id>/` is complete once `manifest.json` exists: it lists every other file with
its size and sha256, and is always written last.
"""

from __future__ import annotations

import json
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from job.errors import ConfigError, JobError
from job.settings import MANIFEST
from job.storage import objects as storage

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")


def package_versions() -> dict[str, str | None]:
    """Python and the ML stack's versions, read from package metadata (nothing is imported)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(
    run_dir: Path,
    *,
    config: dict[str, Any],
    status: str,
    started_at: str,
    ended_at: str,
    metrics: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of `run_dir`: every file but manifest.json (path, size, sha256), the resolved config,
    package versions, headline metrics, start/end time and exit status."""
    files = [
        {"path": rel, "size": (run_dir / rel).stat().st_size, "sha256": storage.sha256_file(run_dir / rel)}
        for rel in storage.list_files(str(run_dir))
        if rel != MANIFEST
    ]
    return {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run_dir.name,
        "status": status,
        "started_at": started_at,
        "ended_at": ended_at,
        "metrics": metrics or {},
        "config": config,
        "versions": package_versions(),
        "files": files,
    }


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two manifests describe the same run (same run_id and start time)."""
    return (a.get("run_id"), a.get("started_at")) == (b.get("run_id"), b.get("started_at"))


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest at `uri`: None if there is none, {} if it does not parse (a foreign or broken run)."""
    try:
        data = json.loads(storage.read_text(uri))
    except storage.NotFound:
        return None
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def publish_run(
    run_dir: Path, dest_uri: str, manifest: dict[str, Any] | None = None, *, replace: bool = False
) -> str:
    """Make `run_dir` visible at `dest_uri` (`<output.uri>/<run_id>`): every file first, manifest.json last.

    `manifest` (from build_manifest) is first written to run_dir/manifest.json; without it, that file must
    exist, so a failed publish is easy to repeat. Publishing again uploads only what is missing or changed.
    Refuses a destination holding another run's manifest unless `replace` (for --overwrite). Returns
    `dest_uri`."""
    dest_uri = dest_uri.rstrip("/") or dest_uri
    local_manifest = run_dir / MANIFEST
    if manifest is not None:
        storage.write_json(str(local_manifest), manifest)
    elif local_manifest.is_file():
        manifest = storage.read_json(str(local_manifest))
    else:
        raise JobError(f"{run_dir}: no {MANIFEST} to publish; build it with build_manifest first")
    _check_local(run_dir, manifest)
    if not storage.is_remote(dest_uri) and storage.local_path(dest_uri).resolve() == run_dir.resolve():
        return dest_uri

    dest_manifest = storage.join(dest_uri, MANIFEST)
    digests = {f["path"]: f["sha256"] for f in manifest["files"]}
    try:
        existing = read_manifest(dest_manifest)
        if existing is not None and not same_run(existing, manifest) and not replace:
            raise ConfigError(
                f"{dest_uri}: already holds another run (run_id {existing.get('run_id')!r}, started "
                f"{existing.get('started_at')!r}); refusing to overwrite it: choose another output.run_id "
                "or output.uri"
            )
        if existing is not None:
            storage.remove(dest_manifest)  # until every file is there again, the run must not look complete
        uploaded = storage.upload_dir(run_dir, dest_uri, files=digests, last=MANIFEST, sha256=digests)
    except ConfigError:
        raise
    except JobError as exc:
        raise type(exc)(
            f"publishing run {manifest.get('run_id')!r} failed: {exc}. No manifest was written at "
            f"{dest_uri}, so it does not look complete; the local copy at {run_dir} is intact; "
            "publish again to finish"
        ) from None
    logger.info("published run %s to %s (%d files uploaded, %d already there)", manifest.get("run_id"),
                dest_uri, len(uploaded), len(digests) + 1 - len(uploaded))
    return dest_uri


def _check_local(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is in run_dir with its recorded size."""
    for entry in manifest.get("files", []):
        path = run_dir / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            raise JobError(f"{path}: missing or changed since the manifest was built; rebuild the manifest")
    listed = {f["path"] for f in manifest.get("files", [])} | {MANIFEST}
    extra = set(storage.list_files(str(run_dir))) - listed
    if extra:
        logger.warning("%s: %d files not in the manifest are not published (e.g. %s)", run_dir, len(extra),
                       sorted(extra)[0])
