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
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from job.errors import ConfigError, CorruptInputError, JobError
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
    except (json.JSONDecodeError, RecursionError, CorruptInputError):
        return {}
    return data if isinstance(data, dict) else {}


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """`manifest` if every entry it lists can be trusted, else CorruptInputError naming `where` and the first
    problem. The one check of every manifest read for push, pull, compare and the after-training commands:
    a JSON object whose `files` and `checkpoints.files` are lists of {path, size, sha256} with a safe relative
    path (`objects.checked_name`; no two alike, never manifest.json), a non-negative integer size and a
    lower-case hex sha256; `checkpoints` absent or an object whose `uri` is null or a string; run_id, status
    and times strings, metrics and config objects, where present."""
    if not isinstance(manifest, dict):
        raise CorruptInputError(f"{where}: not a run manifest (expected a JSON object)")
    for field, kinds in (("run_id", str), ("status", str), ("started_at", str), ("ended_at", str),
                         ("metrics", dict), ("config", dict)):
        if manifest.get(field) is not None and not isinstance(manifest[field], kinds):
            raise CorruptInputError(f"{where}: `{field}` must be a {kinds.__name__ if kinds is str else 'an object'}")
    checkpoints = manifest.get("checkpoints")
    if checkpoints is None:
        checkpoints = {}
    if not isinstance(checkpoints, dict) or not isinstance(checkpoints.get("uri"), (str, type(None))):
        raise CorruptInputError(f"{where}: `checkpoints` must be an object with a `uri` that is null or a string")
    for field, entries in (("files", manifest.get("files")), ("checkpoints.files", checkpoints.get("files", []))):
        if not isinstance(entries, list):
            raise CorruptInputError(f"{where}: `{field}` must be a list of {{path, size, sha256}} entries")
        seen = set()
        for number, entry in enumerate(entries, start=1):
            at = f"{where}: {field}[{number}]"
            if not isinstance(entry, dict):
                raise CorruptInputError(f"{at}: expected {{path, size, sha256}}, got {type(entry).__name__}")
            path = storage.checked_name(entry.get("path"), at)
            size, digest = entry.get("size"), entry.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise CorruptInputError(f"{at} ({path}): `size` must be a non-negative integer")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise CorruptInputError(f"{at} ({path}): `sha256` must be 64 lower-case hex digits")
            if path in seen or (field == "files" and path in (MANIFEST, OVERWRITE_MARKER)):
                raise CorruptInputError(f"{at}: {path!r} is listed twice or names the manifest itself")
            seen.add(path)
    return manifest


def read_checked_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest at `uri` after `check_manifest`: None if there is none; CorruptInputError (exit 3) if it is
    not JSON or does not check out."""
    try:
        text = storage.read_text(uri)
    except storage.NotFound:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptInputError(f"{uri}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise CorruptInputError(f"{uri}: not a run manifest (nested too deeply)") from None
    return check_manifest(data, uri)


def checkpoints_location(run_uri: str, manifest: dict[str, Any]) -> str | None:
    """Where the manifest's checkpoints are: `<run>/checkpoints` or its `checkpoints.uri` when that lies inside
    the run; None when it names a place outside the run (a manifest never sends a reader elsewhere)."""
    uri = (manifest.get("checkpoints") or {}).get("uri")
    if not uri:
        return storage.join(run_uri, CHECKPOINTS_DIR)
    return storage.join(run_uri, rel) if (rel := storage.inside(run_uri, uri)) else None


def _kept_after_overwrite(dest_uri: str, manifest: dict[str, Any]) -> set[str]:
    """Paths under `dest_uri` that the new manifest accounts for: its files, the manifest, and its checkpoints
    when they live under the run (checkpoints/ or a checkpoint_uri inside dest_uri)."""
    kept = {entry["path"] for entry in manifest["files"]} | {MANIFEST}
    checkpoints = manifest.get("checkpoints") or {}
    inside = storage.inside(dest_uri, checkpoints.get("uri") or storage.join(dest_uri, CHECKPOINTS_DIR))
    if inside:
        kept |= {f"{inside}/{entry['path']}" for entry in checkpoints.get("files", [])}
    return kept


def _delete_unlisted(dest_uri: str, manifest: dict[str, Any], only: set[str] | None = None) -> None:
    """After the new manifest is committed: delete every object of the old run it does not list (of `only`,
    when given: what the replaced manifest listed)."""
    kept = _kept_after_overwrite(dest_uri, manifest)
    stale = (set(storage.list_files(dest_uri)) if only is None else only) - kept
    if stale:
        storage.remove_files(dest_uri, stale)
        logger.info("overwrite: deleted %d objects of the old run at %s", len(stale), dest_uri)


def publish_run(
    run_dir: Path, dest_uri: str, manifest: dict[str, Any] | None = None, *, replace: bool = False,
    prune: bool = True,
) -> str:
    """Make `run_dir` visible at `dest_uri` (`<output.uri>/<run_id>`): the manifest's files first, manifest.json
    last. Checkpoints are not copied: the checkpoint mirror (`training.checkpoint_uri`) put them where the
    manifest says.

    `manifest` (from build_manifest) is first written to run_dir/manifest.json; without it, that file must
    exist, so a failed publish is easy to repeat. Publishing again uploads only what is missing or changed.
    Refuses a destination holding another run's manifest unless `replace` (for --overwrite) or an overwrite of
    it is in progress (`begin_overwrite`); replacing deletes, once the new manifest is committed, every object
    the new manifest does not list: under a run folder (`prune`), or, in a folder the user named that may hold
    anything else (`prune=False`), only what the replaced manifest listed. Returns `dest_uri`."""
    dest_uri = dest_uri.rstrip("/") or dest_uri
    local_manifest = run_dir / MANIFEST
    if manifest is not None:
        storage.write_json(str(local_manifest), check_manifest(manifest, str(local_manifest)))
    else:
        manifest = read_checked_manifest(str(local_manifest))
        if manifest is None:
            raise CorruptInputError(f"{run_dir}: no {MANIFEST} to publish; build it with build_manifest first")
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
            _delete_unlisted(dest_uri, manifest, None if prune else _listed(existing))
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


def _listed(manifest: dict[str, Any] | None) -> set[str]:
    """The files a (possibly foreign or broken) manifest lists, if it checks out; else none."""
    try:
        return {entry["path"] for entry in check_manifest(manifest, MANIFEST)["files"]} if manifest else set()
    except CorruptInputError:
        return set()


def _check_local(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is in run_dir with its recorded size."""
    for entry in manifest.get("files", []):
        path = storage.safe_path(run_dir, entry["path"], str(run_dir / MANIFEST))
        if not path.is_file() or path.stat().st_size != entry["size"]:
            raise CorruptInputError(f"{path}: missing or changed since the manifest was built; rebuild the manifest")
    listed = {f["path"] for f in manifest.get("files", [])} | {MANIFEST}
    extra = set(published_files(run_dir)) - listed
    if extra:
        logger.warning("%s: %d files not in the manifest are not published (e.g. %s)", run_dir, len(extra),
                       sorted(extra)[0])
