"""Training: each method learns, the adapter reloads in a fresh process, SIGTERM checkpoints and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from job.config import load_config
from job.data.prepare import prepare
from job.errors import EXIT_PREEMPTED
from job.train.model import load_tokenizer, resolve_model_path
from job.train.resume import plan_run
from job.train.trainer import read_train_log, train

REPEATED = [
    "data.max_train_rows=4", "data.max_eval_rows=4", "training.per_device_batch_size=4",
    "training.gradient_accumulation_steps=1", "training.logging_steps=1", "training.max_seq_len=512",
    "training.warmup_ratio=0", "training.lr_scheduler=constant", "training.save_steps=1000",
    "training.gradient_checkpointing=false",
]


def _train(preset, tiny_model, sample_path, tmp_path, *extra):
    cfg = load_config(
        preset,
        [f"model.name={tiny_model}", f"data.source={sample_path}", f"output.uri={tmp_path}", *REPEATED, *extra],
        environ={},
    )
    plan = plan_run(cfg, "never", overwrite=False)
    cfg, run = plan.cfg, plan.run
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, path)
    result = train(cfg, run, prepare(cfg, tokenizer), checkpoint=None, model_path=path, tokenizer=tokenizer)
    return cfg, run, result


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("gemma-2b-it-qlora", ["training.learning_rate=1e-2"]),
        ("gemma-2b-it-lora", ["training.learning_rate=1e-2"]),
        ("gemma-2b-it-lora", ["training.learning_rate=1e-2", "training.packing=true"]),
        ("gemma-2b-it-prompt-tuning", ["training.learning_rate=3e-1", "method.num_virtual_tokens=8"]),
    ],
)
def test_each_method_lowers_the_loss_on_a_repeated_batch(preset, extra, tiny_model, sample_path, tmp_path):
    cfg, run, result = _train(preset, tiny_model, sample_path, tmp_path, "training.max_steps=12", *extra)
    losses = [entry["loss"] for entry in result.train_log]
    assert len(losses) == 12 and result.global_step == 12
    assert losses[-1] < losses[0] - 0.1, losses
    adapter = json.loads((run.path / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == ("PROMPT_TUNING" if cfg.method.type == "prompt_tuning" else "LORA")
    card = (run.path / "adapter" / "README.md").read_text()
    assert cfg.model.name in card and "Method" in card
    assert (run.path / "config.yaml").is_file() and any((run.path / "logs" / "tensorboard").rglob("events.*"))
    entry = result.train_log[-1]
    assert entry["tokens_per_s"] > 0 and 0 < entry["non_padding_share"] <= 1
    if "training.packing=true" in extra:  # padding-free: every processed token is a real one
        assert entry["non_padding_share"] == 1.0 and result.real_tokens == result.processed_tokens


def test_quantized_base_is_4bit_nf4(tiny_model, sample_path, tmp_path):
    import bitsandbytes as bnb

    _, _, result = _train("gemma-2b-it-qlora", tiny_model, sample_path, tmp_path, "training.max_steps=1")
    base = result.model.get_base_model()
    layer = base.model.layers[0].mlp.gate_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant


def test_adapter_reloads_in_a_fresh_process_with_the_same_logits(tiny_model, sample_path, tmp_path):
    _, run, result = _train(
        "gemma-2b-it-lora", tiny_model, sample_path, tmp_path, "training.max_steps=4", "training.learning_rate=1e-2"
    )
    inputs = torch.arange(5, 45).reshape(2, 20)
    model = result.model.eval()
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(model(input_ids=torch.arange(5, 45).reshape(2, 20)).logits, sys.argv[2])\n"
    )
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(run.path / "adapter"), str(out)], check=True, timeout=120)
    reloaded = torch.load(out)
    assert torch.allclose(reloaded, expected, atol=1e-5)
    base_logits = torch.load(out)  # sanity: the adapter changed the model
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=inputs).logits
    assert not torch.allclose(base_logits, expected, atol=1e-3)


def _finetune(args, **kwargs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_") or k == "FINETUNE_CACHE_DIR"}
    return subprocess.Popen(
        [sys.executable, "-m", "job", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        **kwargs,
    )


def _train_args(tiny_model, sample_path, out, *extra):
    sets = [
        f"model.name={tiny_model}", f"data.source={sample_path}", "data.max_train_rows=64", "data.max_eval_rows=4",
        "training.max_steps=30", "training.per_device_batch_size=2", "training.gradient_accumulation_steps=1",
        "training.logging_steps=1", "training.save_steps=100", "training.learning_rate=5e-3",
        "training.gradient_checkpointing=false", *extra,
    ]
    args = ["train", "--config", "gemma-2b-it-lora", "--output", str(out), "--run-id", "r1"]
    for item in sets:
        args += ["--set", item]
    return args


def _final_loss(run_dir: Path) -> float:
    state = json.loads((run_dir / "checkpoints" / "checkpoint-30" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e][-1]


def test_sigterm_checkpoints_exits_75_and_resume_matches_an_uninterrupted_run(tiny_model, sample_path, tmp_path):
    reference = _finetune(_train_args(tiny_model, sample_path, tmp_path / "reference"))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    out = tmp_path / "preempted"
    process = _finetune(_train_args(tiny_model, sample_path, out))
    log = out / "r1" / "logs" / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(read_train_log(out / "r1")) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == EXIT_PREEMPTED
    stderr = process.stderr.read()
    assert "--resume auto" in stderr and "Traceback" not in stderr
    checkpoints = sorted((out / "r1" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and not (out / "r1" / "manifest.json").exists()
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 3 <= stopped_at < 30

    resumed = _finetune([*_train_args(tiny_model, sample_path, out), "--resume", "auto"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert f"resuming from {checkpoints[-1]}" in resumed.stderr.read()
    steps = [entry["step"] for entry in read_train_log(out / "r1")]
    assert steps == list(range(1, 31))  # no step lost or repeated in the log
    assert _final_loss(out / "r1") == pytest.approx(_final_loss(tmp_path / "reference" / "r1"), rel=1e-4)
    assert (out / "r1" / "manifest.json").is_file() and (out / "r1" / "adapter" / "adapter_config.json").is_file()


def test_finished_run_is_not_overwritten_without_flag(tiny_model, sample_path, tmp_path):
    args = _train_args(tiny_model, sample_path, tmp_path, "training.max_steps=2")
    first = _finetune(args)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    adapter = tmp_path / "r1" / "adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes()

    again = _finetune(args)
    assert again.wait(timeout=120) == 2
    assert "--overwrite" in again.stderr.read()
    assert adapter.read_bytes() == before

    forced = _finetune([*args, "--overwrite", "--set", "training.seed=5"])
    assert forced.wait(timeout=300) == 0, forced.stderr.read()
    assert adapter.read_bytes() != before


def test_packed_rows_do_not_attend_to_each_other(tiny_model):
    """What trl's padding-free collator feeds the model gives each packed row the logits it has alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    first, second = list(range(5, 25)), list(range(30, 42))
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": first}, {"input_ids": second}]
    )
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 32)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits  # trl's compute_loss passes use_cache=False
        alone = model(input_ids=torch.tensor([second])).logits
    assert torch.allclose(packed[0, len(first) :], alone[0], atol=1e-5)


def test_sigterm_during_the_last_step_exits_75_and_resume_trains_nothing(
    tiny_model, sample_path, tmp_path, capsys, monkeypatch
):
    """A SIGTERM in the last step: the Trainer saves that step's checkpoint anyway, and the job stops there (75),
    since evaluating would outlast the grace period; the rerun trains no step again and finishes the run."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from job.train import trainer as trainer_module

    class SigtermInLastStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps - 1:
                os.kill(os.getpid(), signal.SIGTERM)  # PreemptionFlag records it; the step goes on

    callbacks = trainer_module._callbacks
    monkeypatch.setattr(trainer_module, "_callbacks", lambda *a: [*callbacks(*a), SigtermInLastStep()])
    args = _train_args(tiny_model, sample_path, tmp_path, "training.max_steps=3")
    code, _, stderr = run_cli(capsys, *args)
    assert code == EXIT_PREEMPTED, stderr
    assert "stopped by SIGTERM at step 3" in stderr
    assert "rerun with --resume auto to evaluate and publish (training is complete)" in stderr
    run_dir = tmp_path / "r1"
    assert (run_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "adapter").exists()

    monkeypatch.setattr(trainer_module, "_callbacks", callbacks)
    code, _, stderr = run_cli(capsys, *args, "--resume", "auto")
    assert code == 0, stderr
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-3'}" in stderr
    assert "is the last step (3): nothing left to train" in stderr
    assert [entry["step"] for entry in read_train_log(run_dir)] == [1, 2, 3]  # no step trained twice
    assert (run_dir / "manifest.json").is_file()
    saved = load_file(run_dir / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors")
    published = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == published.keys()
    assert all(torch.equal(saved[name], published[name]) for name in saved)  # step 3's weights, as trained
