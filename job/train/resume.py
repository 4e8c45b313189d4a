"""Where a run starts or continues, decided once before anything loads. The only reader of earlier attempts.

`plan_run` settles, in this order:
1. the run id: `--run-id`, else with `--resume auto` the newest unfinished run of this config (in the local
   staging root or in the bucket), else a new one;
2. the final config: run id and checkpoint mirror location (`<output>/<run_id>/checkpoints` for a remote
   output) filled in; nothing changes it later, and it is saved once;
3. protection: a finished run is never replaced without `--overwrite`, an unfinished one needs `--resume` or
   `--overwrite`, and a stored config that differs from this one is refused, naming the fields (exit 2); an
   `--overwrite` that was stopped continues when the same command runs again;
4. the checkpoint to continue from: `--resume PATH`, or the newest complete checkpoint, local or mirrored
   (a remote one is fetched).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.errors import ConfigError
from job.settings import CONFIG_FILE, MANIFEST
from job.storage import objects as storage
from job.storage.run_folder import (
    RunFolder,
    begin_overwrite,
    config_hash,
    destination,
    new_run_id,
    resume_overwrite,
    staging_root,
)
from job.train.checkpoints import TRAINER_STATE, checkpoint_step, fetch_checkpoint, latest_complete_checkpoint
from job.train.distributed import check_resume_world_size

IGNORED_SECTIONS = ("output",)
"""Not compared on resume: where the run is written is not part of what it computes."""
IGNORED_FIELDS = ("training.collective_timeout_s",)
"""Not compared on resume either: how long ranks wait for each other does not change the result."""


@dataclass(frozen=True)
class RunPlan:
    cfg: JobConfig
    """The final config of the run: what is trained, saved in the run folder and written to the manifest."""
    run: RunFolder
    destination: str
    """`<output.uri>/<run_id>`, where the run is published."""
    checkpoint: str | None
    """Local checkpoint folder to resume from, or None to start at step 0."""
    publish_only: bool = False
    """The run finished here earlier but its publish did not complete: publish it, train nothing."""

    def here(self) -> RunPlan:
        """This plan with the run folder, and a checkpoint inside it, under this machine's own staging root
        (`FINETUNE_WORK_DIR`): rank 0 made the plan, and nodes that share no disk need not share that path."""
        path = staging_root(self.cfg) / self.run.run_id
        if path == self.run.path:
            return self
        checkpoint = self.checkpoint
        if checkpoint is not None and Path(checkpoint).is_relative_to(self.run.path):
            checkpoint = str(path / Path(checkpoint).relative_to(self.run.path))
        return replace(self, run=RunFolder(run_id=self.run.run_id, path=path), checkpoint=checkpoint)


def plan_run(cfg: JobConfig, resume: str, overwrite: bool) -> RunPlan:
    """Pick the run folder, finalize the config, protect earlier results, and choose the checkpoint."""
    root = staging_root(cfg)
    run_id = cfg.output.run_id
    if run_id is None and resume == "auto":
        run_id = _latest_unfinished(root, cfg)
    run_id = run_id or new_run_id(cfg)
    final = finalize(cfg, run_id)
    run = RunFolder(run_id=run_id, path=root / run_id)
    publish_only = _protect(final, run, resume, overwrite)
    if run.stored_config() is None:
        run.save_config(final)
    checkpoint = None if publish_only else _checkpoint(final, run, resume)
    check_resume_world_size(checkpoint)
    return RunPlan(final, run, destination(final, run_id), checkpoint, publish_only)


def finalize(cfg: JobConfig, run_id: str) -> JobConfig:
    """A copy of `cfg` with every derived value filled in: the run id, and the checkpoint mirror next to the run
    when the output is remote (so a new machine can resume after a spot instance dies)."""
    final = cfg.model_copy(deep=True)
    final.output.run_id = run_id
    if final.training.checkpoint_uri is None and storage.is_remote(cfg.output.uri):
        final.training.checkpoint_uri = f"{destination(cfg, run_id)}/checkpoints"
    return final


def config_differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`section.field (stored X, now Y)` for every field that differs, sections in IGNORED_SECTIONS aside."""
    differences = []
    for section in sorted(set(stored) | set(new)):
        if section in IGNORED_SECTIONS:
            continue
        old_fields, new_fields = stored.get(section) or {}, new.get(section) or {}
        for field in sorted(set(old_fields) | set(new_fields)):
            old, now = old_fields.get(field), new_fields.get(field)
            if old != now and f"{section}.{field}" not in IGNORED_FIELDS:
                differences.append(f"{section}.{field} (stored {old!r}, now {now!r})")
    return differences


def _latest_unfinished(root: Path, cfg: JobConfig) -> str | None:
    """Newest run of this config without a manifest yet, locally or in the bucket."""
    suffix = f"-{config_hash(cfg)}"
    candidates: set[str] = set()
    if root.is_dir():
        candidates |= {p.name for p in root.iterdir() if p.is_dir() and p.name.endswith(suffix)}
        candidates -= {name for name in candidates if (root / name / MANIFEST).exists()}
    if storage.is_remote(cfg.output.uri):
        remote = {name for name in storage.list_dirs(cfg.output.uri) if name.endswith(suffix)}
        published = {name for name in remote if storage.exists(storage.join(cfg.output.uri, name, MANIFEST))}
        candidates = (candidates | remote) - published
    return max(candidates) if candidates else None


def _protect(cfg: JobConfig, run: RunFolder, resume: str, overwrite: bool) -> bool:
    """Refuse to touch results that must not change; clear the folder on `--overwrite`. True: publish only."""
    remote = storage.is_remote(cfg.output.uri)
    dest = destination(cfg, run.run_id)
    if not overwrite and remote and storage.exists(storage.join(cfg.output.uri, run.run_id, MANIFEST)):
        raise ConfigError(f"run {dest} is finished (has {MANIFEST}); pass --overwrite to replace it")
    # The same --overwrite command again after it was stopped (spot instance, crash): continue that replacement.
    continues_overwrite = overwrite and resume != "never" and resume_overwrite(run.path, dest)
    if overwrite and not continues_overwrite:
        if run.has_content:
            run.clear()
        begin_overwrite(run.path, dest, cfg.training.checkpoint_uri)
        return False
    if not run.has_content:
        return False
    publish_only = run.finished and resume == "auto" and remote  # finished here, but its publish never completed
    if run.finished and not publish_only:
        raise ConfigError(
            f"run {run.path} is finished (has {MANIFEST}); pass --overwrite to replace it, or another run id"
        )
    if resume == "never":
        raise ConfigError(
            f"run {run.path} already holds an unfinished run; pass --resume auto to continue it "
            "or --overwrite to start over"
        )
    stored = run.stored_config()
    differences = config_differences(stored, cfg.model_dump(mode="json")) if stored is not None else []
    if differences:
        raise ConfigError(
            f"run {run.run_id}: the config differs from the one it started with ({run.path / CONFIG_FILE}): "
            f"{'; '.join(differences)}; pass --overwrite to start it over, or another run id"
        )
    return publish_only


def _checkpoint(cfg: JobConfig, run: RunFolder, resume: str) -> str | None:
    if resume == "never":
        return None
    if resume != "auto":
        if not (Path(resume) / TRAINER_STATE).is_file():
            raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {TRAINER_STATE})")
        return resume
    local = latest_complete_checkpoint(str(run.path / "checkpoints"))
    mirror = cfg.training.checkpoint_uri
    mirrored = latest_complete_checkpoint(mirror) if mirror else None
    if mirrored and checkpoint_step(mirrored) > checkpoint_step(local):
        return str(fetch_checkpoint(mirrored, run.sub("checkpoints")))
    return local
