"""The run folder: its id, where it is staged locally, and the config stored in it.

Deciding which folder a run uses and what it continues from lives in one place, `job.train.resume`.
"""

from __future__ import annotations

import hashlib
import json
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
from job.storage.objects import is_remote


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
