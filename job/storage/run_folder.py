"""The run folder: its id, where it is staged locally, and the config stored in it.

Deciding which folder a run uses and what it continues from lives in one place, `job.train.resume`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from job.config import JobConfig
from job.errors import ConfigError
from job.settings import CONFIG_FILE, MANIFEST, cache_root
from job.storage import objects as storage
from job.storage.objects import is_remote

logger = logging.getLogger(__name__)

OVERWRITE_MARKER = ".overwrite-in-progress.json"
"""In a run folder (and at a remote destination) while `--overwrite` is replacing that run."""


def config_hash(cfg: JobConfig) -> str:
    """Short hash of everything that defines the run's result (not where it is written)."""
    data = cfg.model_dump(mode="json", exclude={"output": True, "training": {"checkpoint_uri", "collective_timeout_s"}})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def new_run_id(cfg: JobConfig) -> str:
    """Sortable: UTC timestamp, then the config hash."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{config_hash(cfg)}"


def staging_root(cfg: JobConfig) -> Path:
    """Local parent of run folders: output.uri itself when local, else a work folder (FINETUNE_WORK_DIR)."""
    if not is_remote(cfg.output.uri):
        return Path(cfg.output.uri.removeprefix("file://")).expanduser()
    return Path(os.environ.get("FINETUNE_WORK_DIR") or cache_root() / "runs")


def destination(cfg: JobConfig, run_id: str) -> str:
    """Where the run is published: `<output.uri>/<run_id>`."""
    return f"{cfg.output.uri.rstrip('/')}/{run_id}"


@dataclass
class RunFolder:
    run_id: str
    path: Path
    """Local folder the stages write into; published to `<output.uri>/<run_id>/`."""

    @property
    def finished(self) -> bool:
        return (self.path / MANIFEST).is_file()

    @property
    def has_content(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def stored_config(self) -> dict[str, Any] | None:
        """The config an earlier attempt saved here, or None when there is none."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a config this job wrote; pass --overwrite to start the run over")
        return data

    def save_config(self, cfg: JobConfig) -> None:
        """The final config (run id and derived locations filled in); it holds no secrets (those come from the
        environment)."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / CONFIG_FILE).write_text(cfg.to_yaml())

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def sub(self, *parts: str) -> Path:
        target = self.path.joinpath(*parts)
        target.mkdir(parents=True, exist_ok=True)
        return target


def resume_overwrite(run_dir: Path, dest_uri: str) -> bool:
    """Whether an `--overwrite` of the run at `dest_uri` was started and not committed yet, so that a retry of
    the same command resumes it rather than starting over. On a new machine, `run_dir` adopts the marker."""
    local = run_dir / OVERWRITE_MARKER
    if local.is_file():
        return True
    remote = storage.join(dest_uri, OVERWRITE_MARKER)
    if not storage.is_remote(dest_uri) or not storage.exists(remote):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(str(local), storage.read_text(remote))
    return True


def begin_overwrite(run_dir: Path, dest_uri: str, checkpoint_uri: str | None) -> None:
    """Start replacing the run at `dest_uri`: delete the old run's checkpoints at `checkpoint_uri` (a resume must
    never continue them), then mark the replacement in `run_dir` and at `dest_uri`. The old run stays readable
    until `publish_run` commits the new manifest."""
    if checkpoint_uri:
        removed = storage.remove_tree(checkpoint_uri)
        if removed:
            logger.info("overwrite: removed %d files of the old run's checkpoints at %s", removed, checkpoint_uri)
    marker = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "replaces": dest_uri}
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(run_dir / OVERWRITE_MARKER), marker)
    if storage.is_remote(dest_uri):
        storage.write_json(storage.join(dest_uri, OVERWRITE_MARKER), marker)
