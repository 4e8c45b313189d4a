"""The trl seam and the loss: what the real trainer's dataloader yields, and a loss computed on supervised
positions only whose gradients equal those of the full-logits loss (LoRA, QLoRA, prompt tuning)."""

from __future__ import annotations

import itertools

import pytest
import torch

from job.config import load_config
from job.data.prepare import prepare
from job.data.prompts import ChatFormatter
from job.errors import ConfigError
from job.train.model import load_tokenizer, resolve_model_path
from job.train.resume import plan_run
from job.train.trainer import build_trainer


def _trainer(preset, model_dir, sample_path, tmp_path, *extra):
    cfg = load_config(
        preset,
        [
            f"model.name={model_dir}", f"data.source={sample_path}", f"output.uri={tmp_path}", "data.max_train_rows=12",
            "training.per_device_batch_size=4", "training.gradient_checkpointing=false", "training.max_steps=1",
            *extra,
        ],
        environ={},
    )
    plan = plan_run(cfg, "never", overwrite=False)
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, path)
    prepared = prepare(plan.cfg, tokenizer)
    return build_trainer(plan.cfg, plan.run, prepared, model_path=path, tokenizer=tokenizer), prepared, tokenizer


def _sequences(batch):
    """(input_ids, labels) of each row of a padded or a packed (padding-free) batch."""
    if "attention_mask" in batch:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            keep = mask.bool()
            yield ids[keep].tolist(), labels[keep].tolist()
        return
    starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
    for start, end in itertools.pairwise(starts):
        yield batch["input_ids"][0, start:end].tolist(), batch["labels"][0, start:end].tolist()


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_chatml_model"])
@pytest.mark.parametrize("packing", ["false", "true"])
def test_dataloader_batches_mask_every_prompt_token_and_train_the_end_of_turn(
    model_fixture, packing, request, sample_path, tmp_path
):
    trainer, prepared, tokenizer = _trainer(
        "gemma-2b-it-lora", request.getfixturevalue(model_fixture), sample_path, tmp_path, f"training.packing={packing}"
    )
    formatter = ChatFormatter(tokenizer)
    features = prepared.train_features["input_ids"]
    rows = {tuple(ids): row for ids, row in zip(features, prepared.splits.train, strict=True)}
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>" if model_fixture == "tiny_model" else "<|im_end|>")
    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels in _sequences(batch):
            row = rows[tuple(ids)]  # the row as the data stage prepared it, not cut or changed by trl
            prompt_len = len(tokenizer(formatter.prompt(row), add_special_tokens=False)["input_ids"])
            assert ids[:prompt_len] == tokenizer(formatter.prompt(row), add_special_tokens=False)["input_ids"]
            assert set(labels[:prompt_len]) == {-100}, "a prompt token is trained"
            assert labels[prompt_len:] == ids[prompt_len:], "an answer token is not trained"
            assert labels[-1] == end_of_turn and labels.count(end_of_turn) == 1
            answer = tokenizer.decode(labels[prompt_len:-1])
            assert answer.strip() == row["sql"].strip()
            seen += 1
    assert seen == len(prepared.splits.train) == 12


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("gemma-2b-it-lora", []),
        ("gemma-2b-it-qlora", []),
        ("gemma-2b-it-prompt-tuning", ["method.num_virtual_tokens=6"]),
        ("gemma-2b-it-lora", ["training.packing=true"]),
    ],
)
def test_loss_on_supervised_positions_has_the_gradients_of_the_full_logits_loss(
    preset, extra, tiny_model, sample_path, tmp_path, monkeypatch
):
    from trl.kernels import ChunkedLogProbFunction

    trainer, _, _ = _trainer(preset, tiny_model, sample_path, tmp_path, "method.lora_dropout=0", *extra)
    model = trainer.model.train()  # without dropout both losses see the same network
    params = [p for p in model.parameters() if p.requires_grad]
    batch = next(iter(trainer.get_train_dataloader()))
    projected = []
    apply = ChunkedLogProbFunction.apply

    def recording(hidden, *args):
        projected.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(ChunkedLogProbFunction, "apply", recording)
    loss = trainer.compute_loss(model, dict(batch))
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert projected == [supervised] and supervised < 0.5 * batch["input_ids"].numel()  # the head saw answers only

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    full = model(**inputs, labels=batch["labels"], use_cache=False)  # transformers' loss over the full logits
    assert full.logits.shape[-1] == model.config.vocab_size
    assert loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    for fused_grad, full_grad in zip(_grads(loss, params), _grads(full.loss, params), strict=True):
        # trl keeps QLoRA adapters in bf16 (QLoRA paper): their gradients agree to bf16 precision
        tolerance = {"rtol": 2e-2, "atol": 1e-4} if fused_grad.dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-6}
        torch.testing.assert_close(fused_grad, full_grad, **tolerance)
    assert any(g.abs().sum() > 0 for g in _grads(trainer.compute_loss(model, dict(batch)), params))


def test_micro_batches_with_accumulation_give_the_gradients_of_one_batch(tiny_model, sample_path, tmp_path):
    """The demo trains 8 rows per step in micro-batches of 2: the loss is normalised by the answer tokens of the
    whole step (`num_items_in_batch`), so the accumulated gradient equals that of one batch of 8."""
    trainer, _, _ = _trainer(
        "gemma-2b-it-lora", tiny_model, sample_path, tmp_path, "method.lora_dropout=0",
        "training.per_device_batch_size=8",
    )
    assert trainer.model_accepts_loss_kwargs  # so transformers passes num_items_in_batch and does not rescale
    model = trainer.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = next(iter(trainer.get_train_dataloader()))
    whole = _grads(trainer.compute_loss(model, dict(batch)), params)
    total = int((batch["labels"][:, 1:] != -100).sum())
    accumulated = [torch.zeros_like(p) for p in params]
    naive = [torch.zeros_like(p) for p in params]  # each micro-batch's mean loss / 4: unequal token weights
    for first in range(0, 8, 2):
        micro = {k: v[first : first + 2] for k, v in batch.items()}
        normalised = _grads(trainer.compute_loss(model, dict(micro), num_items_in_batch=total), params)
        means = _grads(trainer.compute_loss(model, dict(micro)), params)
        for acc, nai, grad, mean in zip(accumulated, naive, normalised, means, strict=True):
            acc += grad
            nai += mean / 4
    for grad, acc in zip(whole, accumulated, strict=True):
        torch.testing.assert_close(acc, grad, rtol=1e-4, atol=1e-6)
    flat = torch.cat([g.flatten() for g in whole])
    assert not torch.allclose(torch.cat([g.flatten() for g in naive]), flat, rtol=1e-3)  # normalisation matters


def test_every_preset_warms_the_learning_rate_up(tmp_path):
    """transformers ignores the warmup of a `constant` schedule; each preset's schedule must start below its lr."""
    from types import SimpleNamespace

    from transformers import get_scheduler

    from job.config import list_presets
    from job.storage.run_folder import RunFolder
    from job.train.trainer import sft_config

    for preset in list_presets():
        cfg = load_config(preset, ["training.max_steps=100"], environ={})
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
        args = sft_config(cfg, RunFolder("r", tmp_path / preset), model, quantized=False)
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=cfg.training.learning_rate)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(100),
                                  num_training_steps=100)
        lrs = []
        for _ in range(10):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        assert args.get_warmup_steps(100) == round(100 * cfg.training.warmup_ratio) > 0, preset
        assert lrs[0] == 0.0 and lrs[1] < lrs[args.get_warmup_steps(100)] <= cfg.training.learning_rate, (preset, lrs)
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        load_config("gemma-2b-it-qlora", ["training.lr_scheduler=constant"], environ={})
