"""`finetune run` end to end on a tiny model: one load of the model, and the same predictions as loading twice."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_cli, sets

EVAL = ["data.max_eval_rows=6", "evaluation.max_new_tokens=12", "evaluation.batch_size=3"]
TRAIN = [
    "data.max_train_rows=16", "training.max_steps=3", "training.per_device_batch_size=4",
    "training.gradient_accumulation_steps=1", "training.logging_steps=1", "training.gradient_checkpointing=false",
]


def _predictions(folder):
    return {r["id"]: r["raw"] for r in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())}


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("gemma-2b-it-lora", ["training.learning_rate=1e-2"]),
        ("gemma-2b-it-prompt-tuning", ["training.learning_rate=3e-1", "method.num_virtual_tokens=4"]),
    ],
)
def test_run_loads_the_model_once_and_predicts_as_two_separate_loads_do(
    preset, extra, capsys, monkeypatch, tmp_path, tiny_model, sample_path
):
    import job.train.model as model_module

    calls = {"load_base_model": 0, "resolve_model_path": 0}
    for name in calls:
        original = getattr(model_module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(model_module, name, counted)
    data = [f"model.name={tiny_model}", f"data.source={sample_path}", *EVAL]
    code, _, err = run_cli(
        capsys, "run", "--config", preset, *sets(*data, *TRAIN, *extra), "--output", str(tmp_path), "--run-id", "r"
    )
    assert code == 0, err
    assert calls == {"load_base_model": 1, "resolve_model_path": 1}
    monkeypatch.undo()

    eval_dir = tmp_path / "r" / "eval"
    code, _, err = run_cli(capsys, "evaluate", "--config", preset, *sets(*data), "--base-only",
                           "--output", str(tmp_path / "base"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "evaluate", "--config", preset, *sets(*data),
                           "--adapter", str(tmp_path / "r" / "adapter"), "--output", str(tmp_path / "tuned"))
    assert code == 0, err
    tuned = _predictions(eval_dir / "tuned")
    assert _predictions(eval_dir / "base") == _predictions(tmp_path / "base" / "base")
    assert tuned == _predictions(tmp_path / "tuned" / "tuned")
    assert tuned != _predictions(eval_dir / "base")  # training changed the answers: the comparison can fail
