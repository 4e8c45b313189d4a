"""Run folders and resume: ids, `--resume auto` picking the newest unfinished run of the same config, overwrite
protection, a config that is final (derived values filled in) before the run starts, changed configs refused."""

from __future__ import annotations

import pytest
import yaml

from job.config import load_config
from job.errors import ConfigError
from job.storage.run_folder import config_hash, new_run_id
from job.train.resume import finalize, plan_run


def _cfg(tmp_path, *extra):
    return load_config("gemma-2b-it-qlora", [f"output.uri={tmp_path}", *extra], environ={})


def _started(tmp_path, name, cfg):
    """A run folder as an interrupted attempt of `cfg` leaves it."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.yaml").write_text(finalize(cfg, name).to_yaml())


def test_run_id_is_sortable_and_names_the_config(tmp_path):
    cfg = _cfg(tmp_path)
    run_id = new_run_id(cfg)
    assert run_id.endswith(config_hash(cfg)) and run_id[:8].isdigit()
    assert config_hash(cfg) == config_hash(_cfg(tmp_path / "elsewhere"))  # where it is written does not count
    assert config_hash(cfg) != config_hash(_cfg(tmp_path, "training.max_steps=9"))


def test_resume_auto_continues_the_newest_unfinished_run_of_this_config(tmp_path):
    cfg = _cfg(tmp_path)
    suffix = config_hash(cfg)
    for name in (f"20260101-000000-{suffix}", f"20260102-000000-{suffix}"):
        _started(tmp_path, name, cfg)
    _started(tmp_path, "20260103-000000-deadbeef", _cfg(tmp_path, "training.max_steps=9"))
    (tmp_path / f"20260102-000000-{suffix}" / "manifest.json").write_text("{}")  # finished
    existing = {p.name for p in tmp_path.iterdir()}
    assert plan_run(cfg, "auto", overwrite=False).run.run_id == f"20260101-000000-{suffix}"
    assert plan_run(cfg, "never", overwrite=False).run.run_id not in existing  # a fresh run


def test_unfinished_run_needs_resume_or_overwrite_and_finished_run_needs_overwrite(tmp_path):
    cfg = _cfg(tmp_path, "output.run_id=r")
    _started(tmp_path, "r", cfg)
    with pytest.raises(ConfigError, match="--resume auto"):
        plan_run(cfg, "never", overwrite=False)
    (tmp_path / "r" / "manifest.json").write_text("{}")
    (tmp_path / "r" / "result.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        plan_run(cfg, "auto", overwrite=False)
    assert (tmp_path / "r" / "result.txt").read_text() == "keep me"
    plan_run(cfg, "auto", overwrite=True)
    assert not (tmp_path / "r" / "result.txt").exists()


def test_resume_with_a_changed_config_names_the_fields_and_overwrite_starts_over(tmp_path):
    _started(tmp_path, "r", _cfg(tmp_path, "output.run_id=r"))
    (tmp_path / "r" / "checkpoints").mkdir()
    changed = _cfg(tmp_path, "output.run_id=r", "training.learning_rate=0.5", "method.lora_r=8")
    with pytest.raises(ConfigError) as error:
        plan_run(changed, "auto", overwrite=False)
    message = str(error.value)
    assert "training.learning_rate (stored 0.0002, now 0.5)" in message and "method.lora_r" in message
    assert "training.max_steps" not in message and "--overwrite" in message
    assert (tmp_path / "r" / "checkpoints").is_dir()  # nothing touched

    plan = plan_run(changed, "auto", overwrite=True)
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["training"]["learning_rate"] == 0.5
    assert plan.checkpoint is None
    assert plan_run(changed, "auto", overwrite=False).cfg == plan.cfg  # the same config resumes


def test_the_config_is_final_before_the_run_starts_and_saved_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr("job.storage.objects.list_dirs", lambda uri: [])
    monkeypatch.setattr("job.storage.objects.exists", lambda uri: False)
    monkeypatch.setattr("job.train.resume.latest_complete_checkpoint", lambda location: None)
    cfg = load_config("gemma-2b-it-qlora", ["output.uri=s3://bucket/runs", "output.run_id=r"], environ={})
    plan = plan_run(cfg, "auto", overwrite=False)
    assert plan.cfg.training.checkpoint_uri == "s3://bucket/runs/r/checkpoints" and plan.cfg.output.run_id == "r"
    assert plan.destination == "s3://bucket/runs/r"
    assert cfg.training.checkpoint_uri is None  # the caller's config is not mutated
    saved = yaml.safe_load((tmp_path / "work" / "r" / "config.yaml").read_text())
    assert saved == plan.cfg.model_dump(mode="json")
    explicit = load_config(
        "gemma-2b-it-qlora", ["output.uri=s3://bucket/runs", "training.checkpoint_uri=s3://other/ck"], environ={}
    )
    assert finalize(explicit, "x").training.checkpoint_uri == "s3://other/ck"
    assert finalize(_cfg(tmp_path), "x").training.checkpoint_uri is None  # local output: checkpoints in the folder
