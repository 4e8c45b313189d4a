"""Shared fixtures: tiny models built once per session, offline Hugging Face, isolated caches and env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from tiny import CHATML_TEMPLATE, SAMPLE, build_model_dir

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests: no example database written into the repository, no per-example deadline on a busy machine;
# each test sets its own (small) max_examples.
settings.register_profile(
    "finetune", database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "finetune"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Gemma model whose tokenizer uses Gemma's chat template (no system role)."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="session")
def tiny_chatml_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with a ChatML template (has a system role, like SmolLM2)."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-chatml"), template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def sample_path() -> Path:
    """400 real rows of gretelai/synthetic_text_to_sql shipped with the package (see job/data/PROVENANCE.md)."""
    return SAMPLE


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in list(os.environ):
        if name.startswith("FINETUNE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "finetune-cache"))
from after_fixtures import *  # noqa: E402,F403  (tiny trained runs for export/ask/compare)
from s3_fixtures import *  # noqa: E402,F403  (loopback S3 server fixtures)
