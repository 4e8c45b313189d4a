"""The run folder: its id, where it is staged locally, and protection of finished runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from job.config import JobConfig
from job.errors import ConfigError
from job.settings import CONFIG_FILE, MANIFEST, cache_root
from job.storage.objects import is_remote, join
from job.storage.publish import begin_overwrite, resume_overwrite


def config_hash(cfg: JobConfig) -> str:
    """Short hash of everything that defines the run's result (not where it is written)."""
    data = cfg.model_dump(mode="json", exclude={"output": True, "training": {"checkpoint_uri"}})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def new_run_id(cfg: JobConfig) -> str:
    """Sortable: UTC timestamp, then the config hash."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{config_hash(cfg)}"


def staging_root(cfg: JobConfig) -> Path:
    """Local parent of run folders: output.uri itself when local, else a work folder (FINETUNE_WORK_DIR)."""
    if not is_remote(cfg.output.uri):
        return Path(cfg.output.uri.removeprefix("file://")).expanduser()
    return Path(os.environ.get("FINETUNE_WORK_DIR") or cache_root() / "runs")


@dataclass
class RunFolder:
    run_id: str
    path: Path
    """Local folder the stages write into; published to `<output.uri>/<run_id>/`."""

    @property
    def finished(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def save_config(self, cfg: JobConfig) -> None:
        """The resolved config, run id included; it holds no secrets (those come from the environment)."""
        resolved = cfg.model_copy(deep=True)
        resolved.output.run_id = self.run_id
        (self.path / CONFIG_FILE).write_text(resolved.to_yaml())

    def sub(self, *parts: str) -> Path:
        target = self.path.joinpath(*parts)
        target.mkdir(parents=True, exist_ok=True)
        return target


def _latest_unfinished(root: Path, cfg: JobConfig) -> str | None:
    """Newest run of this config without a manifest yet (what `--resume auto` continues), locally or in the bucket."""
    suffix = f"-{config_hash(cfg)}"
    candidates = set()
    if root.is_dir():
        candidates |= {p.name for p in root.iterdir() if p.is_dir() and p.name.endswith(suffix)}
        candidates -= {name for name in candidates if (root / name / MANIFEST).exists()}
    if is_remote(cfg.output.uri):
        from job.storage.artifacts import list_runs

        remote = list_runs(cfg.output.uri)
        candidates |= {r["run_id"] for r in remote if r["run_id"].endswith(suffix) and not r["complete"]}
        candidates -= {r["run_id"] for r in remote if r["complete"]}
    return max(candidates) if candidates else None


def _published_remotely(cfg: JobConfig, run_id: str) -> bool:
    if not is_remote(cfg.output.uri):
        return False
    from job.storage import objects as storage

    return storage.exists(storage.join(cfg.output.uri, run_id, MANIFEST))


def open_run_folder(cfg: JobConfig, resume: str, overwrite: bool) -> RunFolder:
    """Create or reopen the run folder; a finished run is never overwritten without `--overwrite`."""
    root = staging_root(cfg)
    run_id = cfg.output.run_id
    if run_id is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("output.run_id: set it (or --run-id) when several processes train together")
    if run_id is None and resume == "auto":
        run_id = _latest_unfinished(root, cfg)
    run_id = run_id or new_run_id(cfg)
    folder = RunFolder(run_id=run_id, path=root / run_id)
    destination = join(cfg.output.uri, run_id)
    resumes_overwrite = overwrite and resume != "never" and resume_overwrite(folder.path, destination)
    if not overwrite and _published_remotely(cfg, run_id):
        raise ConfigError(
            f"run {cfg.output.uri.rstrip('/')}/{run_id} is finished (has {MANIFEST}); pass --overwrite to replace it"
        )
    if folder.path.exists() and any(folder.path.iterdir()):
        if overwrite and not resumes_overwrite:
            shutil.rmtree(folder.path)
        elif folder.finished and resume == "auto" and is_remote(cfg.output.uri):
            return folder  # finished here, but its publish never completed: the pipeline publishes it again
        elif folder.finished:
            raise ConfigError(
                f"run {folder.path} is finished (has {MANIFEST}); pass --overwrite to replace it, or another run id"
            )
        elif resume == "never":
            raise ConfigError(
                f"run {folder.path} already holds an unfinished run; pass --resume auto to continue it "
                "or --overwrite to start over"
            )
    folder.path.mkdir(parents=True, exist_ok=True)
    if overwrite and not resumes_overwrite:  # a retry of the same --overwrite command resumes from here
        mirrored = join(destination, "checkpoints") if is_remote(destination) else None  # the pipeline's default
        begin_overwrite(folder.path, destination, cfg.training.checkpoint_uri or mirrored)
    folder.save_config(cfg)
    return folder
