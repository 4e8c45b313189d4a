"""`evaluate --run` uses exactly the run's recorded eval ids and refuses rows the adapter trained on; `--rows`
evaluates a whole file; results are published with a manifest last; an in-memory model gives the same predictions
as loading base and adapter from disk (LoRA and prompt tuning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run_cli, sets

from job.config import load_config
from job.data.sources import load_splits

SMALL = ["evaluation.max_new_tokens=6", "evaluation.batch_size=2", "evaluation.test_suite_size=2",
         "evaluation.suite_candidates=8"]


def _cfg(tiny_model: Path, sample_path: Path, preset: str = "gemma-2b-it-lora", *extra: str):
    return load_config(preset, [f"model.name={tiny_model}", f"data.source={sample_path}", "data.max_eval_rows=20",
                                *SMALL, *extra], environ={})


def _save_adapter(cfg, path: Path, kind: str) -> Path:
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from job.train.model import load_base_model, load_tokenizer, resolve_model_path

    model_path = resolve_model_path(cfg.model.name)
    torch.manual_seed(0)
    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                            task_type="CAUSAL_LM")
    else:
        config = PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    model = get_peft_model(load_base_model(cfg.model, model_path), config)
    model.save_pretrained(path)
    load_tokenizer(cfg.model, model_path).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_model, sample_path) -> tuple[Path, list, list]:
    """A finished run as the pipeline leaves it: config.yaml, data/eval_ids.json, adapter/."""
    cfg = _cfg(tiny_model, sample_path)
    run = tmp_path_factory.mktemp("runs") / "r1"
    (run / "data").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    splits = load_splits(cfg.data)
    eval_ids = [row["id"] for row in splits.eval[:3]]
    (run / "data" / "eval_ids.json").write_text(json.dumps(eval_ids))
    _save_adapter(cfg, run / "adapter", "lora")
    return run, eval_ids, [row["id"] for row in splits.train]


def _ids(path: Path) -> list:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_evaluate_run_uses_exactly_the_recorded_eval_ids(capsys, tmp_path, run_folder) -> None:
    run, eval_ids, _ = run_folder
    code, out, err = run_cli(capsys, "evaluate", "--run", str(run), "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert _ids(tmp_path / "out" / "tuned" / "predictions.jsonl") == eval_ids
    assert not (tmp_path / "out" / "base").exists()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["tuned"]["n_rows"] == 3 and metrics["tuned"]["test_suite"]["size"] == 2  # --set-free: run's config
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert {"metrics.json", "report.md", "report.html", "tuned/predictions.jsonl", "tuned/scored.jsonl"} <= listed
    assert manifest["metrics"]["tuned"]["n_rows"] == 3 and manifest["status"] == "completed"
    assert "tuned: execution accuracy (test suite)" in out and "single-DB" in out


def test_evaluate_run_refuses_rows_the_adapter_trained_on(capsys, tmp_path, run_folder) -> None:
    run, eval_ids, train_ids = run_folder
    leaky = tmp_path / "leaky"
    for path in run.rglob("*"):
        if path.is_file():
            target = leaky / path.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (leaky / "data" / "eval_ids.json").write_text(json.dumps([eval_ids[0], train_ids[0]]))
    code, _, err = run_cli(capsys, "evaluate", "--run", str(leaky), "--output", str(tmp_path / "out"))
    assert code == 2 and "training split" in err and str(train_ids[0]) in err
    assert not (tmp_path / "out").exists()

    rows = tmp_path / "rows.jsonl"  # --rows with --run: a file holding a trained row is refused too
    cfg = load_config(str(run / "config.yaml"), [], environ={})
    splits = load_splits(cfg.data)
    rows.write_text("".join(json.dumps(r) + "\n" for r in (splits.eval[3], splits.train[1])))
    code, _, err = run_cli(capsys, "evaluate", "--run", str(run), "--rows", str(rows), "--output",
                           str(tmp_path / "out2"))
    assert code == 2 and "--rows" in err and "training split" in err


def test_evaluate_rows_scores_every_row_of_a_file_without_a_split(capsys, tmp_path, tiny_model, sample_path):
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()[:3]]
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(
        capsys, "evaluate", "--config", "gemma-2b-it-lora", "--base-only", "--rows", str(path),
        *sets(f"model.name={tiny_model}", *SMALL), "--output", str(tmp_path / "out"),
    )
    assert code == 0, err
    assert _ids(tmp_path / "out" / "base" / "predictions.jsonl") == [r["id"] for r in rows]
    assert (tmp_path / "out" / "manifest.json").is_file()
    code, _, err = run_cli(capsys, "evaluate", "--base-only", "--rows", str(path), "--output", str(tmp_path / "out"))
    assert code == 2 and "--overwrite" in err  # results are never replaced silently


@pytest.mark.parametrize(("preset", "kind"), [("gemma-2b-it-lora", "lora"), ("gemma-2b-it-prompt-tuning", "prompt")])
def test_in_memory_model_predicts_exactly_like_loading_base_then_adapter(tmp_path, tiny_model, sample_path,
                                                                         preset, kind) -> None:
    from peft import PeftModel

    from job.evaluation.evaluate import evaluate_models
    from job.train.model import load_base_model, load_tokenizer, resolve_model_path

    cfg = _cfg(tiny_model, sample_path, preset)
    adapter = _save_adapter(cfg, tmp_path / "adapter", kind)
    rows = load_splits(cfg.data).eval[:4]
    from_disk = evaluate_models(cfg, tmp_path / "disk", adapter=adapter, compare_base=True, rows=rows)

    model_path = resolve_model_path(cfg.model.name)
    model = PeftModel.from_pretrained(load_base_model(cfg.model, model_path), adapter)
    model.train()  # e.g. just trained: evaluation switches to eval mode and back
    in_memory = evaluate_models(cfg, tmp_path / "memory", compare_base=True, rows=rows, model=model,
                                tokenizer=load_tokenizer(cfg.model, model_path))
    assert model.training
    for label in ("base", "tuned"):
        disk = (tmp_path / "disk" / label / "predictions.jsonl").read_text()
        memory = (tmp_path / "memory" / label / "predictions.jsonl").read_text()
        assert [json.loads(x)["raw"] for x in memory.splitlines()] == [json.loads(x)["raw"] for x in disk.splitlines()]
    base, tuned = ([json.loads(x)["raw"] for x in (tmp_path / "memory" / label / "predictions.jsonl").read_text()
                    .splitlines()] for label in ("base", "tuned"))
    assert base != tuned  # the adapter changes the answers, so "base" really ran without it
    assert from_disk["base"]["n_rows"] == in_memory["base"]["n_rows"] == 4


def test_evaluate_to_a_bucket_publishes_every_file_then_the_manifest(capsys, tmp_path, tiny_model, sample_path,
                                                                     s3_bucket, s3_client) -> None:
    path = tmp_path / "two.jsonl"
    path.write_text("".join(line + "\n" for line in sample_path.read_text().splitlines()[:2]))
    output = f"s3://{s3_bucket}/evals/e2"
    code, _, err = run_cli(capsys, "evaluate", "--config", "gemma-2b-it-lora", "--base-only", "--rows", str(path),
                           *sets(f"model.name={tiny_model}", *SMALL), "--output", output)
    assert code == 0, err
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="evals/e2/")["Contents"]
    keys = {item["Key"].removeprefix("evals/e2/") for item in listed}
    manifest = json.loads(s3_client.get_object(Bucket=s3_bucket, Key="evals/e2/manifest.json")["Body"].read())
    assert {f["path"] for f in manifest["files"]} | {"manifest.json"} == keys
    assert manifest["metrics"]["base"]["n_rows"] == 2
