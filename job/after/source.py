"""Find a run's adapter, config and manifest from a run folder, an adapter folder, or an s3:// URI of either."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from job.config import ModelConfig
from job.errors import ConfigError, MissingInputError
from job.settings import CONFIG_FILE, MANIFEST, cache_root
from job.storage import objects as storage
from job.storage.publish import read_checked_manifest

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class RunSource:
    uri: str
    adapter_dir: Path
    """A local copy of the peft adapter folder."""
    model: ModelConfig | None
    """The run's base model config (None for a bare adapter folder)."""
    manifest: dict[str, Any] | None

    @property
    def adapter_config(self) -> dict[str, Any]:
        return json.loads((self.adapter_dir / ADAPTER_CONFIG).read_text())

    @property
    def run_id(self) -> str:
        return (self.manifest or {}).get("run_id") or self.uri.rstrip("/").rsplit("/", 1)[-1]

    def tokenizer_path(self, base_path: str) -> str:
        """The adapter's tokenizer (the job saves it there, chat template included), else the base model's."""
        return str(self.adapter_dir) if (self.adapter_dir / "tokenizer_config.json").is_file() else base_path

    def model_config(self) -> ModelConfig:
        """The base model as the run trained it; for a bare adapter, the base its adapter_config names."""
        if self.model is not None:
            return self.model.model_copy()
        return ModelConfig(name=self.adapter_config["base_model_name_or_path"], quantization="none")


def _read_model_config(text: str | None, where: str) -> ModelConfig | None:
    """Only the model section: the rest of a run's config (e.g. its tracker) need not apply on this machine."""
    if text is None:
        return None
    try:
        return ModelConfig.model_validate((yaml.safe_load(text) or {})["model"])
    except Exception as exc:
        raise ConfigError(f"{where}: not a readable run config ({type(exc).__name__})") from None


def _read_optional(uri: str) -> str | None:
    try:
        return storage.read_text(uri)
    except storage.NotFound:
        return None


def open_run_source(uri: str, option: str = "RUN") -> RunSource:
    """A run folder (`<run>/adapter/`), or an adapter folder, local or s3://; one-line errors otherwise."""
    uri = uri.rstrip("/") or uri
    if storage.is_remote(uri):
        if storage.exists(storage.join(uri, "adapter", ADAPTER_CONFIG)):
            adapter_uri, run_uri = storage.join(uri, "adapter"), uri
        elif storage.exists(storage.join(uri, ADAPTER_CONFIG)):
            adapter_uri, run_uri = uri, None
        else:
            raise MissingInputError(f"{option} {uri}: no run (adapter/{ADAPTER_CONFIG}) or adapter ({ADAPTER_CONFIG})")
        adapter_dir = storage.fetch_to_cache(adapter_uri, cache_root() / "adapters")
    else:
        path = storage.local_path(uri)
        if not path.exists():
            raise ConfigError(f"{option} {uri}: no such folder")
        if (path / "adapter" / ADAPTER_CONFIG).is_file():
            adapter_dir, run_uri = path / "adapter", uri
        elif (path / ADAPTER_CONFIG).is_file():
            adapter_dir = path
            run_uri = str(path.parent) if (path.parent / CONFIG_FILE).is_file() else None
        else:
            raise ConfigError(f"{option} {uri}: not a run folder (no adapter/{ADAPTER_CONFIG}) nor an adapter folder")
    model = manifest = None
    if run_uri is not None:
        model = _read_model_config(_read_optional(storage.join(run_uri, CONFIG_FILE)), f"{option} {uri}")
        manifest = read_checked_manifest(storage.join(run_uri, MANIFEST))
    return RunSource(uri=uri, adapter_dir=adapter_dir, model=model, manifest=manifest)
