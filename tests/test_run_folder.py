"""Run folders: ids, `--resume auto` picking the newest unfinished run of the same config, overwrite protection."""

from __future__ import annotations

import pytest

from job.config import load_config
from job.errors import ConfigError
from job.storage.run_folder import config_hash, new_run_id, open_run_folder


def _cfg(tmp_path, *extra):
    return load_config("gemma-2b-it-qlora", [f"output.uri={tmp_path}", *extra], environ={})


def test_run_id_is_sortable_and_names_the_config(tmp_path):
    cfg = _cfg(tmp_path)
    run_id = new_run_id(cfg)
    assert run_id.endswith(config_hash(cfg)) and run_id[:8].isdigit()
    assert config_hash(cfg) == config_hash(_cfg(tmp_path / "elsewhere"))  # where it is written does not count
    assert config_hash(cfg) != config_hash(_cfg(tmp_path, "training.max_steps=9"))


def test_resume_auto_continues_the_newest_unfinished_run_of_this_config(tmp_path):
    cfg = _cfg(tmp_path)
    suffix = config_hash(cfg)
    for name in (f"20260101-000000-{suffix}", f"20260102-000000-{suffix}", "20260103-000000-deadbeef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("x")
    (tmp_path / f"20260102-000000-{suffix}" / "manifest.json").write_text("{}")  # finished
    existing = {p.name for p in tmp_path.iterdir()}
    assert open_run_folder(cfg, "auto", overwrite=False).run_id == f"20260101-000000-{suffix}"
    assert open_run_folder(cfg, "never", overwrite=False).run_id not in existing  # a fresh run


def test_unfinished_run_needs_resume_or_overwrite_and_finished_run_needs_overwrite(tmp_path):
    cfg = _cfg(tmp_path, "output.run_id=r")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("x")
    with pytest.raises(ConfigError, match="--resume auto"):
        open_run_folder(cfg, "never", overwrite=False)
    (tmp_path / "r" / "manifest.json").write_text("{}")
    (tmp_path / "r" / "result.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        open_run_folder(cfg, "auto", overwrite=False)
    assert (tmp_path / "r" / "result.txt").read_text() == "keep me"
    open_run_folder(cfg, "auto", overwrite=True)
    assert not (tmp_path / "r" / "result.txt").exists()


def test_several_processes_need_an_explicit_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"output\.run_id"):
        open_run_folder(_cfg(tmp_path), "auto", overwrite=False)
