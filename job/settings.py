"""Settings shared by every stage, defined once: the cache root, the shipped resources, run-folder names."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

MANIFEST = "manifest.json"
"""Written last into a run folder (or an evaluation's output): its presence means the results are complete."""
RUN_STATE = "run_state.json"
CONFIG_FILE = "config.yaml"
PRESET_PACKAGE = "job.resources.configs"


def cache_root() -> Path:
    """Where converted models, fetched inputs and staged runs go (`FINETUNE_CACHE_DIR`, else ~/.cache/finetune)."""
    return Path(os.environ.get("FINETUNE_CACHE_DIR") or Path.home() / ".cache" / "finetune")


def shipped_sample() -> Path:
    """The 400 real gretel rows that ship with the package (see resources/data/PROVENANCE.md)."""
    return Path(str(resources.files("job.resources") / "data" / "gretel_train_sample.jsonl"))
