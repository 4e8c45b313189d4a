"""The training stage: trl's SFTTrainer on the prepared rows, with checkpoints, resume and SIGTERM handling."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.data.prepare import PreparedData
from job.errors import PreemptedError
from job.storage.run_folder import RunFolder
from job.train import distributed
from job.train.preemption import PreemptionFlag

TRACKED_BATCHES = 1000


class PaddedTokenCounter:
    """Wraps the data collator to count the tokens the model processes, padding included; the real (non-padding)
    tokens are transformers' own count, `state.num_input_tokens_seen` (`include_num_input_tokens_seen`)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.processed_tokens = 0
        self.batch_rows: list[frozenset[int]] = []
        """Fingerprints of the rows of each batch (the first TRACKED_BATCHES), to show how ranks split the data."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        if len(self.batch_rows) < TRACKED_BATCHES:
            self.batch_rows.append(frozenset(hash(tuple(example["input_ids"])) for example in examples))
        self.processed_tokens += batch["input_ids"].numel()
        return batch


def _callbacks(run: RunFolder, counter: PaddedTokenCounter, preemption: PreemptionFlag) -> list[Any]:
    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        """One JSON line per logging step (and a human line on stderr): loss, lr, tokens/s, padding share, ETA."""

        def __init__(self) -> None:
            self.path = run.sub("logs") / "train_log.jsonl"
            self.start = self.last_time = time.monotonic()
            self.last_tokens = self.first_tokens = 0
            self.first_step: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.first_step = state.global_step
            self.last_tokens = self.first_tokens = state.num_input_tokens_seen
            if state.is_world_process_zero and self.path.is_file():  # resumed: drop lines past the checkpoint
                kept = [e for e in read_train_log(run.path) if e["step"] <= state.global_step]
                self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            # Every rank logs at the same steps: sum the padded tokens of all ranks (a collective, so before the rank
            # check); transformers' count of real tokens is already summed over the ranks.
            (processed,) = distributed.sum_all([counter.processed_tokens])
            if not state.is_world_process_zero:
                return
            now = time.monotonic()
            tokens = state.num_input_tokens_seen
            done = state.global_step - (self.first_step or 0)
            eta = (now - self.start) / done * (state.max_steps - state.global_step) if done else None
            record = {
                "step": state.global_step,
                "max_steps": state.max_steps,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_s": round((tokens - self.last_tokens) / max(now - self.last_time, 1e-9), 1),
                "non_padding_share": round((tokens - self.first_tokens) / max(processed, 1), 4),
                "elapsed_s": round(now - self.start, 1),
                "eta_s": round(eta, 1) if eta is not None else None,
            }
            self.last_time, self.last_tokens = now, tokens
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta is not None else "?"
            print(
                f"step {record['step']}/{record['max_steps']}  loss {record['loss']:.4f}  "
                f"lr {record['learning_rate'] or 0:.2e}  {record['tokens_per_s']:.0f} tok/s  "
                f"non-padding {record['non_padding_share']:.0%}  ETA {eta_text}",
                file=sys.stderr,
                flush=True,
            )

    class StopOnSigterm(TrainerCallback):
        """On SIGTERM to any rank, every rank saves a checkpoint at the end of the same step and stops (the flag
        is shared with an all-reduce each step)."""

        def on_step_end(self, args, state, control, **kwargs):
            if distributed.any_rank(preemption.requested):
                preemption.requested = True
                control.should_save = True
                control.should_training_stop = True
            return control

    class CheckpointBarrier(TrainerCallback):
        """Every rank has written its part of a checkpoint (its RNG state) before anyone uses it (the mirror)."""

        def on_save(self, args, state, control, **kwargs):
            distributed.barrier()

    class NothingLeftToTrain(TrainerCallback):
        """Resumed from the checkpoint of the last step (a run stopped during or after its last step), the
        Trainer would train one step more, since it compares the step count with max_steps only after a step:
        stop it once it has loaded that checkpoint, before any step."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise TrainingComplete

    return [ProgressLog(), StopOnSigterm(), CheckpointBarrier(), _process_count(), NothingLeftToTrain()]


class TrainingComplete(Exception):
    """The checkpoint resumed from is the last step: its weights are loaded and nothing is left to train."""


def _process_count() -> Any:
    """A callback that records the number of processes in every checkpoint's trainer_state.json, which rank 0
    writes (transformers' ExportableState: `stateful_callbacks["ProcessCount"]`); see
    `distributed.checkpoint_world_size`. On several nodes rank 0's folder lacks the other nodes' RNG files, so
    counting them there would be wrong."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class ProcessCount(TrainerCallback, ExportableState):
        def __init__(self, world_size: int) -> None:
            self.world_size = world_size

        def state(self) -> dict[str, Any]:
            return {"args": {"world_size": self.world_size}, "attributes": {}}

        def on_train_begin(self, args, state, control, **kwargs):
            # A checkpoint saved before the count was recorded has no entry, which the Trainer's save expects.
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    assert ProcessCount.__name__ == distributed.WORLD_SIZE_STATE
    return ProcessCount(distributed.world_size())


def _optimizer(cfg: JobConfig, quantized: bool, cuda: bool) -> str:
    if cfg.training.optim != "auto":
        return cfg.training.optim
    if cuda:
        return "paged_adamw_8bit" if quantized else "adamw_torch_fused"
    return "adamw_torch"


def uses_packing(cfg: JobConfig, model: Any) -> bool:
    """Whether rows are packed padding-free; prompt tuning never packs (its virtual tokens prefix each row)."""
    if cfg.method.type != "lora" or cfg.training.packing is False:
        return False
    if cfg.training.packing is True:
        return True
    return "flash" in str(getattr(model.config, "_attn_implementation", ""))


def tracker_run_id(run_id: str) -> str:
    """The run id with what W&B does not allow in run ids (anything but letters, digits, '-', '_') replaced."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_id)


def sft_config(cfg: JobConfig, run: RunFolder, model: Any, quantized: bool) -> Any:
    import torch
    from trl import SFTConfig

    from job.train.model import compute_dtype

    t = cfg.training
    cuda = torch.cuda.is_available()
    # The configured compute dtype, not the model's: k-bit preparation upcasts a QLoRA model's own params to fp32.
    dtype = compute_dtype(cfg.model)
    packing = uses_packing(cfg, model)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.sub("logs", "tensorboard"))  # read by transformers' callback
    if t.report_to == "wandb":  # W&B's run id is the job's, so evaluation can add its metrics to the same run
        os.environ["WANDB_RUN_ID"] = tracker_run_id(run.run_id)
    return SFTConfig(
        output_dir=str(run.sub("checkpoints")),
        max_length=t.max_seq_len,
        packing=packing,
        packing_strategy="bfd",
        # group_by_length draws its order from each process's global RNG, which dropout moves differently per rank:
        # from the second epoch on, ranks would train on overlapping rows. accelerate seeds the random sampler per
        # epoch, identically on every rank.
        train_sampling_strategy="random" if packing or distributed.world_size() > 1 else "group_by_length",
        completion_only_loss=None,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=_optimizer(cfg, quantized, cuda),
        include_num_input_tokens_seen="non_padding",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        run_name=run.run_id,
        dataloader_pin_memory=cuda,
        disable_tqdm=not sys.stderr.isatty() or not distributed.is_main(),
        ddp_find_unused_parameters=False,
        dataset_num_proc=None,
        use_cpu=not cuda,  # without it, processes launched on CPUs train side by side instead of data-parallel
        ddp_timeout=int(t.collective_timeout_s),
        **fsdp_arguments(cfg, model),
    )


def fsdp_arguments(cfg: JobConfig, model: Any) -> dict[str, Any]:
    """With `training.distributed: fsdp`, shard the base's layers (and the adapter) across the processes."""
    if cfg.training.distributed != "fsdp":
        return {}
    layers = sorted(getattr(model, "_no_split_modules", None) or [])
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,  # full shard
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layers,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
            "activation_checkpointing": False,
        },
    }


@dataclass
class TrainResult:
    adapter_dir: Path
    global_step: int
    final_loss: float | None
    train_log: list[dict[str, Any]]
    train_seconds: float = 0.0
    """Wall time of `trainer.train()` in this session."""
    real_tokens: int = 0
    """Tokens of training rows processed in this session (padding excluded; transformers' own count)."""
    processed_tokens: int = 0
    """Tokens the model processed in this session, padding included."""
    model: Any = None
    """The trained peft model, still in memory."""


def build_trainer(cfg: JobConfig, run: RunFolder, prepared: PreparedData, *, model_path: str, tokenizer: Any) -> Any:
    """trl's SFTTrainer on the prepared rows, its loss on supervised positions only (job.train.loss)."""
    from trl import SFTTrainer

    from job.train.loss import supervised_positions_only
    from job.train.model import is_quantized, load_base_model, peft_config, prepare_for_training

    supervised_positions_only()
    base = load_base_model(cfg.model, model_path, sharded=cfg.training.distributed == "fsdp")
    quantized = is_quantized(base)
    base = prepare_for_training(base, cfg)
    return SFTTrainer(
        model=base,
        args=sft_config(cfg, run, base, quantized),
        train_dataset=prepared.train_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config(cfg.method, model_path),
    )


def train(
    cfg: JobConfig, run: RunFolder, prepared: PreparedData, *, checkpoint: str | None, model_path: str, tokenizer: Any
) -> TrainResult:
    """Train the configured method on the prepared rows, from `checkpoint` when given (see job.train.resume);
    save the adapter, tokenizer and model card. `cfg` is final: nothing here changes it."""
    trainer = build_trainer(cfg, run, prepared, model_path=model_path, tokenizer=tokenizer)
    counter = PaddedTokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressLog prints one richer line per logging step
    if checkpoint:
        distributed.say(f"resuming from {checkpoint}")
    if distributed.world_size() > 1:
        t = cfg.training
        batch = distributed.describe_batch(t.per_device_batch_size, t.gradient_accumulation_steps)
        distributed.say(f"data parallel ({t.distributed}, {distributed.world_size()} processes): {batch}")
    with PreemptionFlag() as preemption:
        progress, *others = _callbacks(run, counter, preemption)
        for callback in (progress, *others):
            trainer.add_callback(callback)
        if cfg.training.checkpoint_uri:
            from job.train.checkpoints import CheckpointMirror

            mirror = CheckpointMirror(cfg.training.checkpoint_uri)
            trainer.add_callback(mirror)
        started = time.monotonic()
        try:
            output = trainer.train(resume_from_checkpoint=checkpoint)
        except TrainingComplete:
            output = None
            distributed.say(f"{checkpoint} is the last step ({trainer.state.global_step}): nothing left to train")
        train_seconds = time.monotonic() - started
        # Every rank stops if any was asked to, also when the SIGTERM came during the last step (whose checkpoint
        # the Trainer saves anyway): evaluation would not finish within the grace period.
        if distributed.any_rank(preemption.requested):
            if cfg.training.checkpoint_uri:
                mirror.wait()
            distributed.barrier()  # the ranks exit together, after rank 0 has mirrored the checkpoint
            step, last = trainer.state.global_step, trainer.state.max_steps
            rest = "continue" if step < last else "evaluate and publish (training is complete)"
            raise PreemptedError(
                f"stopped by SIGTERM at step {step}; checkpoint saved in "
                f"{cfg.training.checkpoint_uri or run.path / 'checkpoints'}; rerun with --resume auto to {rest}"
            )
    adapter_dir = run.path / "adapter"
    trainer.save_model(str(adapter_dir))  # on every rank: under FSDP the ranks gather the weights together
    _record_ranks(run, counter)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(adapter_dir))
        from job.train.model_card import write_model_card

        write_model_card(adapter_dir, cfg, prepared, trainer.state.global_step, packed=trainer.args.packing,
                         world_size=distributed.world_size())
    train_log = read_train_log(run.path)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # Without a logged step: the run's mean loss (None when it resumed with nothing left to train).
    final_loss = losses[-1] if losses else (output.training_loss if output else None)
    result = TrainResult(
        adapter_dir, trainer.state.global_step, final_loss, train_log,
        train_seconds=train_seconds, real_tokens=trainer.state.num_input_tokens_seen - progress.first_tokens,
        processed_tokens=counter.processed_tokens, model=trainer.model,
    )
    _release(trainer)
    return result


def _record_ranks(run: RunFolder, counter: PaddedTokenCounter) -> None:
    """`logs/ranks.json` (several processes only): the rows and tokens each rank trained on, and how many rows
    two ranks had in the same batch (0: the ranks split each global batch; more would be duplicated work)."""
    if distributed.world_size() <= 1:
        return
    gathered = distributed.gather_all((counter.batch_rows, counter.processed_tokens))
    if not distributed.is_main():
        return
    batches = [rows for rows, _ in gathered]
    duplicated = sum(
        len(a & b)
        for same_batch in zip(*batches, strict=False)
        for i, a in enumerate(same_batch)
        for b in same_batch[i + 1 :]
    )
    record = {
        "world_size": len(gathered),
        "ranks": [
            {"rank": r, "batches": len(rows), "rows": sum(map(len, rows)), "processed_tokens": tokens}
            for r, (rows, tokens) in enumerate(gathered)
        ],
        "batches_compared": min(map(len, batches)),
        "rows_in_several_ranks_batches": duplicated,
    }
    (run.sub("logs") / "ranks.json").write_text(json.dumps(record, indent=2) + "\n")


def _release(trainer: Any) -> None:
    """Free what only training needs (optimizer state, gradients, the accelerator's references) so that
    evaluation runs beside nothing but the trained model."""
    import gc

    import torch

    trainer.model.zero_grad(set_to_none=True)
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.accelerator.free_memory()
    trainer.callback_handler.callbacks.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_train_log(run_path: Path) -> list[dict[str, Any]]:
    path = run_path / "logs" / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
