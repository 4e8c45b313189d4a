"""Measuring a training run from outside the trainer: step times, real tokens, peak memory, model FLOPs, MFU."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. First match of the device name
# wins, so the more specific names come first ("GH200" before "H200", "H100 PCIe" before "H100").
BF16_PEAK_TFLOPS = [
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.05), ("L4", 121.0),
]


class PartFailed(RuntimeError):
    """A part's own check did not hold (e.g. a subprocess exited with the wrong code)."""


class StepClock:
    """Per-step wall times and real (non-padding) tokens of every micro-batch, for any transformers Trainer.

    Installed through transformers' DEFAULT_CALLBACKS while a part runs (see `observe_trainers`), so the job's own
    trainer is observed without changing it. Real tokens: the attention mask's sum, or every token of a
    padding-free batch (which has no mask and no padding).
    """

    def __init__(self) -> None:
        self.step_end_times: list[float] = []
        self.batch_tokens: list[int] = []
        self.batch_shapes: list[int] = []
        """Tokens the model processed per micro-batch, padding included."""
        self.settings: dict[str, Any] = {}
        self.start = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class _Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
                clock.settings = _trainer_settings(args, model)
                if train_dataloader is not None:  # accelerate's DataLoaderShard iterates the loader it wraps
                    loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
                    collate = loader.collate_fn

                    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
                        batch = collate(examples)
                        mask = batch.get("attention_mask")
                        clock.batch_tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
                        clock.batch_shapes.append(batch["input_ids"].numel())
                        return batch

                    loader.collate_fn = counting
                clock.start = synchronized_now()

            def on_step_end(self, args, state, control, **kwargs):
                clock.step_end_times.append(synchronized_now())

        return _Clock()

    def steady(self, warmup_steps: int, accumulation: int) -> dict[str, Any]:
        """Real tokens and seconds of the steps after the warmup ones."""
        steps = len(self.step_end_times)
        if steps <= warmup_steps:
            raise PartFailed(f"only {steps} optimizer steps ran; need more than the {warmup_steps} warmup steps")
        seconds = self.step_end_times[-1] - self.step_end_times[warmup_steps - 1] if warmup_steps else (
            self.step_end_times[-1] - self.start)
        window = slice(warmup_steps * accumulation, steps * accumulation)
        tokens = sum(self.batch_tokens[window])
        return {"timed_steps": steps - warmup_steps, "timed_real_tokens": tokens, "timed_seconds": seconds,
                "real_tokens_per_s": tokens / seconds, "non_padding_share": tokens / sum(self.batch_shapes[window]),
                "all_real_tokens": sum(self.batch_tokens[: steps * accumulation])}


def synchronized_now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.monotonic()


def _trainer_settings(args: Any, model: Any) -> dict[str, Any]:
    """What the trainer actually ran with: the figures' conditions, read from its arguments and model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quant = getattr(getattr(base, "config", None), "quantization_config", None)
    quant = (quant.to_dict() if hasattr(quant, "to_dict") else quant) or {}
    return {
        "optim": str(getattr(args.optim, "value", args.optim)),
        "bf16": bool(args.bf16), "fp16": bool(args.fp16),
        "gradient_checkpointing": bool(args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "packing": getattr(args, "packing", None), "padding_free": getattr(args, "padding_free", None),
        "max_length": getattr(args, "max_length", None),
        "attn_implementation": getattr(getattr(base, "config", None), "_attn_implementation", None),
        "load_in_4bit": bool(getattr(base, "is_loaded_in_4bit", False)),
        "bnb_4bit_quant_type": quant.get("bnb_4bit_quant_type"),
        "bnb_4bit_use_double_quant": quant.get("bnb_4bit_use_double_quant"),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


@contextlib.contextmanager
def observe_trainers() -> Iterator[StepClock]:
    """Every transformers Trainer created inside gets a StepClock callback (restored afterwards)."""
    import transformers.trainer as hf_trainer

    clock = StepClock()
    saved = hf_trainer.DEFAULT_CALLBACKS
    hf_trainer.DEFAULT_CALLBACKS = [*saved, clock.callback()]
    try:
        yield clock
    finally:
        hf_trainer.DEFAULT_CALLBACKS = saved


class PeakMemory:
    """Peak memory of one part: `torch.cuda.max_memory_allocated` on a GPU, else the process's peak RSS (Linux)."""

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        self.cuda = torch.cuda.is_available()
        self.kind = "cuda_max_memory_allocated" if self.cuda else "cpu_peak_rss"
        self.at_start = None
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.at_start = torch.cuda.memory_allocated()
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size
        self.peak: int | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            status = Path("/proc/self/status")
            line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM:")), None) if (
                status.is_file()) else None
            self.peak = int(line.split()[1]) * 1024 if line else None

    def as_dict(self) -> dict[str, Any]:
        return {"peak_memory_bytes": self.peak, "memory_kind": self.kind, "memory_allocated_at_start": self.at_start}


def model_flops_per_token(n_params: int, dims: dict[str, int], mean_context: float) -> float:
    """Training FLOPs per token: 6·N + 12·L·(heads·head_dim)·s (PaLM, Chowdhery et al. 2022, appendix B).

    6·N counts forward and backward through every weight as for full fine-tuning (N: all base parameters; the tied
    embedding counts once, as the LM head's matmul). With the base frozen, LoRA needs no weight gradients (~4·N),
    but gradient checkpointing recomputes the forward (+2·N), so 6·N is also close to what the GPU executes.
    s is the attended context: Σ len² / Σ len over the trained rows (non-causal count, as in PaLM).
    """
    attention = 12 * dims["num_hidden_layers"] * dims["num_attention_heads"] * dims["head_dim"] * mean_context
    return 6 * n_params + attention


def bf16_peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key.lower() in device_name.lower()), None)
