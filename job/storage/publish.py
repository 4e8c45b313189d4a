"""The run manifest, and publishing a run folder so that readers never see a manifest before its files.

A run folder `<output.uri>/<run_id>/` is complete once `manifest.json` exists, and it is always written last. It
lists the published run (adapter, reports, logs, data, config) with each file's size and sha256 under `files`,
and, separately under `checkpoints`, the trainer checkpoints (with optimizer state) and where they are: those
are not part of the published run, and `artifacts pull` fetches them only when asked.

Replacing a run (`--overwrite`) starts with `run_folder.begin_overwrite`, which drops the old run's checkpoints
and leaves a marker so that a retry of the same command resumes the replacement; `publish_run` then removes the old
manifest, uploads the new files, commits the new manifest, and only then deletes every object the new manifest
does not list. A reader sees the old run, an incomplete run, or the new run: never a mix.
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
from job.storage.run_folder import OVERWRITE_MARKER

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2
"""2: `files` holds the published run only; checkpoints are listed under `checkpoints`."""
CHECKPOINTS_DIR = "checkpoints"
"""The Trainer's output folder inside a run folder (checkpoint-N subfolders)."""
_TRAINER_STATE = "trainer_state.json"
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


def _entry(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": storage.sha256_file(path)}


def _checkpoint_files(run_dir: Path) -> list[str]:
    """Files of the complete checkpoints (`checkpoint-N/` holding trainer_state.json), relative to checkpoints/."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    complete = {p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
                and (p / _TRAINER_STATE).is_file()}
    return [rel for rel in storage.list_files(str(root)) if rel.split("/", 1)[0] in complete]


def published_files(run_dir: Path) -> list[str]:
    """The run folder's files that make up the published run: not the manifest, checkpoints or the marker."""
    return [rel for rel in storage.list_files(str(run_dir))
            if rel not in (MANIFEST, OVERWRITE_MARKER) and rel.split("/", 1)[0] != CHECKPOINTS_DIR]


def build_manifest(
    run_dir: Path,
    *,
    config: dict[str, Any],
    status: str,
    started_at: str,
    ended_at: str,
    metrics: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of `run_dir`: the published files (path, size, sha256), the checkpoints separately (their
    location, `training.checkpoint_uri`, or null for the run folder's own checkpoints/, and files), the resolved
    config, package versions, headline metrics, start/end time and exit status."""
    checkpoint_uri = (config.get("training") or {}).get("checkpoint_uri")
    return {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run_dir.name,
        "status": status,
        "started_at": started_at,
        "ended_at": ended_at,
        "metrics": metrics or {},
        "config": config,
        "versions": package_versions(),
        "files": [_entry(run_dir, rel) for rel in published_files(run_dir)],
        "checkpoints": {
            "uri": checkpoint_uri,
            "files": [_entry(run_dir / CHECKPOINTS_DIR, rel) for rel in _checkpoint_files(run_dir)],
        },
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


def _kept_after_overwrite(dest_uri: str, manifest: dict[str, Any]) -> set[str]:
    """Paths under `dest_uri` that the new manifest accounts for: its files, the manifest, and its checkpoints
    when they live under the run (checkpoints/ or a checkpoint_uri inside dest_uri)."""
    kept = {entry["path"] for entry in manifest["files"]} | {MANIFEST}
    checkpoints = manifest.get("checkpoints") or {}
    location = checkpoints.get("uri") or storage.join(dest_uri, CHECKPOINTS_DIR)
    inside = location.rstrip("/").removeprefix(dest_uri.rstrip("/") + "/")
    if inside != location.rstrip("/"):
        kept |= {f"{inside}/{entry['path']}" for entry in checkpoints.get("files", [])}
    return kept


def _delete_unlisted(dest_uri: str, manifest: dict[str, Any]) -> None:
    """After the new manifest is committed: delete every object of the old run it does not list."""
    kept = _kept_after_overwrite(dest_uri, manifest)
    stale = set(storage.list_files(dest_uri)) - kept
    if stale:
        storage.remove_files(dest_uri, stale)
        logger.info("overwrite: deleted %d objects of the old run at %s", len(stale), dest_uri)


def publish_run(
    run_dir: Path, dest_uri: str, manifest: dict[str, Any] | None = None, *, replace: bool = False
) -> str:
    """Make `run_dir` visible at `dest_uri` (`<output.uri>/<run_id>`): the manifest's files first, manifest.json
    last. Checkpoints are not copied: the checkpoint mirror (`training.checkpoint_uri`) put them where the
    manifest says.

    `manifest` (from build_manifest) is first written to run_dir/manifest.json; without it, that file must
    exist, so a failed publish is easy to repeat. Publishing again uploads only what is missing or changed.
    Refuses a destination holding another run's manifest unless `replace` (for --overwrite) or an overwrite of
    it is in progress (`begin_overwrite`); replacing deletes, once the new manifest is committed, every object
    the new manifest does not list. Returns `dest_uri`."""
    dest_uri = dest_uri.rstrip("/") or dest_uri
    local_manifest = run_dir / MANIFEST
    if manifest is not None:
        storage.write_json(str(local_manifest), manifest)
    elif local_manifest.is_file():
        manifest = storage.read_json(str(local_manifest))
    else:
        raise JobError(f"{run_dir}: no {MANIFEST} to publish; build it with build_manifest first")
    _check_local(run_dir, manifest)
    replace = replace or (run_dir / OVERWRITE_MARKER).is_file()
    if not storage.is_remote(dest_uri) and storage.local_path(dest_uri).resolve() == run_dir.resolve():
        (run_dir / OVERWRITE_MARKER).unlink(missing_ok=True)
        return dest_uri

    dest_manifest = storage.join(dest_uri, MANIFEST)
    digests = {f["path"]: f["sha256"] for f in manifest["files"]} | {MANIFEST: None}
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
        uploaded = storage.upload_dir(run_dir, dest_uri, files=digests, last=MANIFEST,
                                      sha256={k: v for k, v in digests.items() if v})
        if replace:
            _delete_unlisted(dest_uri, manifest)
    except ConfigError:
        raise
    except JobError as exc:
        raise type(exc)(
            f"publishing run {manifest.get('run_id')!r} failed: {exc}. No manifest was written at "
            f"{dest_uri}, so it does not look complete; the local copy at {run_dir} is intact; "
            "publish again to finish"
        ) from None
    (run_dir / OVERWRITE_MARKER).unlink(missing_ok=True)
    logger.info("published run %s to %s (%d files uploaded, %d already there)", manifest.get("run_id"),
                dest_uri, len(uploaded), len(digests) - len(uploaded))
    return dest_uri


def _check_local(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is in run_dir with its recorded size."""
    for entry in manifest.get("files", []):
        path = run_dir / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            raise JobError(f"{path}: missing or changed since the manifest was built; rebuild the manifest")
    listed = {f["path"] for f in manifest.get("files", [])} | {MANIFEST}
    extra = set(published_files(run_dir)) - listed
    if extra:
        logger.warning("%s: %d files not in the manifest are not published (e.g. %s)", run_dir, len(extra),
                       sorted(extra)[0])
