"""Checkpoints in local folders or S3: finding the newest complete one, fetching it, and mirroring saves.

A Trainer checkpoint `checkpoint-N` is complete once its `trainer_state.json` exists and parses: the Trainer
writes it last, and the mirror uploads it last, so a half-written or half-uploaded checkpoint never counts.
`CheckpointMirror` subclasses transformers' TrainerCallback and is defined on first access, so importing this
module does not import transformers (or torch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.errors import JobError, MissingInputError
from job.storage import objects as storage

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
SNAPSHOT_DIR = ".checkpoint-mirror"
"""Under the Trainer's output_dir: hard-linked snapshots of checkpoints being uploaded, so checkpoint rotation
(save_total_limit) cannot delete files mid-upload."""
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

if TYPE_CHECKING:
    CheckpointMirror: type[_Mirror]  # defined by __getattr__ below, subclassing transformers.TrainerCallback


def is_complete(location: str) -> bool:
    """Whether the checkpoint folder at `location` has a trainer_state.json that parses."""
    try:
        json.loads(storage.read_text(storage.join(location, TRAINER_STATE)))
    except (storage.NotFound, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def latest_complete_checkpoint(location: str) -> str | None:
    """The `checkpoint-N` folder under `location` (local folder or s3:// prefix) with the highest N that is
    complete, or None (also when a local `location` does not exist yet)."""
    try:
        names = storage.list_dirs(location)
    except storage.NotFound:
        return None
    steps = sorted(((int(m.group(1)), n) for n in names if (m := _CHECKPOINT.fullmatch(n))), reverse=True)
    for _, name in steps:
        candidate = storage.join(location, name)
        if is_complete(candidate):
            return candidate
    return None


def checkpoint_step(location: str | None) -> int:
    """N of a `checkpoint-N` folder; -1 for None."""
    return int(location.rstrip("/").rsplit("-", 1)[-1]) if location else -1


def fetch_checkpoint(uri: str, local_dir: Path) -> Path:
    """A complete checkpoint as a local folder: a remote one is downloaded to `local_dir/<name>` (replacing
    what is there, via a temporary folder), a local one is returned as it is."""
    if not is_complete(uri):
        raise MissingInputError(f"{uri}: not a complete checkpoint (no valid {TRAINER_STATE})")
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    target = local_dir / name
    partial = local_dir / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    storage.download_dir(uri, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    logger.info("fetched checkpoint %s into %s", uri, target)
    return target


def _snapshot(src: Path, dest: Path) -> Path:
    """Hard-link copy of a checkpoint folder (a real copy where links are not possible)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, copy_function=link)
    return dest


def prune_checkpoints(location: str, keep: int) -> list[str]:
    """Delete all but the `keep` newest complete `checkpoint-N` folders under `location` (local or s3://), and
    any incomplete one older than the oldest kept (a half-finished upload). Newer incomplete ones are left
    alone: they may be uploads in flight. Each goes trainer_state.json first, so a half-deleted checkpoint never
    counts as complete. Returns the names deleted."""
    try:
        names = storage.list_dirs(location)
    except storage.NotFound:
        return []
    steps = sorted(((int(m.group(1)), n) for n in names if (m := _CHECKPOINT.fullmatch(n))), reverse=True)
    complete = [(step, name) for step, name in steps if is_complete(storage.join(location, name))]
    kept = complete[:keep]
    if len(kept) < keep or not kept:
        return []
    oldest_kept = kept[-1][0]
    doomed = [name for step, name in steps if step < oldest_kept]
    for name in doomed:
        folder = storage.join(location, name)
        storage.remove(storage.join(folder, TRAINER_STATE))
        storage.remove_tree(folder)
    if doomed:
        logger.info("checkpoint mirror: pruned %s from %s (save_total_limit %d)", ", ".join(doomed), location, keep)
    return doomed


class _Mirror:
    """Uploads each checkpoint the Trainer saves to `<checkpoint_uri>/checkpoint-<step>/`, trainer_state.json
    last, then prunes the mirror to the Trainer's `save_total_limit` (the newest complete checkpoints stay), as
    the Trainer does locally.

    Several nodes share no disk: rank 0's folder holds the weights, optimizer, trainer state and the RNG states
    of its own node's ranks, while each process on another node holds only its own `rng_state_<rank>.pth`. So on
    each save every process off rank 0's node first uploads its own RNG state (a few KB, at once), then all
    processes agree (an all-reduce) that every one succeeded, and only then does rank 0 upload its folder in a
    background thread, trainer_state.json last: a mirrored checkpoint counts as complete only once every
    process's part is in it. At most one upload is in flight: a save waits for the previous upload. Failures are
    logged when they happen and raised by rank 0's `wait()`, which `on_train_end` calls; call `wait()` yourself
    to flush on SIGTERM."""

    def __init__(self, checkpoint_uri: str) -> None:
        self.checkpoint_uri = checkpoint_uri.rstrip("/")
        self._thread: threading.Thread | None = None
        self._failures: list[str] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from job.train import distributed

        name = f"checkpoint-{state.global_step}"
        src = Path(args.output_dir) / name
        dest = storage.join(self.checkpoint_uri, name)
        if state.is_world_process_zero:
            self._join()
        own_failure = None if distributed.on_main_node() else self._upload_own_rng_state(src, dest)
        if distributed.any_rank(own_failure is not None):
            if state.is_world_process_zero:  # its trainer_state.json is not uploaded: the mirror never counts it
                self._failures.append(f"{name}: a process on another node could not upload its RNG state "
                                      "(its log says why); this checkpoint was not mirrored")
            return
        if not state.is_world_process_zero:
            return
        if not src.is_dir():
            logger.warning("checkpoint mirror: %s not found, nothing to upload", src)
            return
        snapshot = _snapshot(src, Path(args.output_dir) / SNAPSHOT_DIR / name)
        keep = getattr(args, "save_total_limit", None)  # the Trainer rotates local checkpoints to the same
        self._thread = threading.Thread(target=self._upload, args=(snapshot, dest, keep), name=f"mirror-{name}")
        self._thread.start()

    def _upload_own_rng_state(self, checkpoint: Path, dest: str) -> str | None:
        """Upload this process's RNG state of `checkpoint` (a process off rank 0's node); the failure, or None."""
        from job.train import distributed

        path = checkpoint / f"rng_state_{distributed.rank()}.pth"
        if not path.is_file():  # saved without RNG states (save_only_model): nothing of this process to add
            return None
        try:
            storage.upload_file(path, storage.join(dest, path.name))
        except Exception as exc:
            logger.error("checkpoint mirror: upload of %s to %s failed: %s", path, dest, exc)
            return str(exc)
        return None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.wait()

    def wait(self) -> None:
        """Block until the upload in flight is done; raise JobError if uploads failed since the last wait."""
        self._join()
        failures, self._failures = self._failures, []
        if failures:
            raise JobError(
                f"checkpoint mirror to {self.checkpoint_uri}: {len(failures)} upload(s) failed: "
                f"{'; '.join(failures)} (the local checkpoints are intact)"
            )

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _upload(self, snapshot: Path, dest: str, keep: int | None = None) -> None:
        try:
            storage.upload_dir(snapshot, dest, last=TRAINER_STATE)
            logger.info("checkpoint mirror: %s uploaded to %s", snapshot.name, dest)
            if keep:
                prune_checkpoints(self.checkpoint_uri, keep)
        except Exception as exc:
            logger.error("checkpoint mirror: upload of %s to %s failed: %s", snapshot.name, dest, exc)
            self._failures.append(f"{snapshot.name}: {exc}")
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
            with contextlib.suppress(OSError):
                snapshot.parent.rmdir()  # only once empty


def __getattr__(name: str) -> Any:
    """Defines `CheckpointMirror(_Mirror, transformers.TrainerCallback)` on first use."""
    if name != "CheckpointMirror":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import TrainerCallback

    namespace = {"__module__": __name__, "__doc__": _Mirror.__doc__}
    cls = type("CheckpointMirror", (_Mirror, TrainerCallback), namespace)
    globals()[name] = cls
    return cls
