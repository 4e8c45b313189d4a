"""The training loss on supervised positions only: the LM head never sees a prompt token.

trl's SFTTrainer already computes its loss through a fused LM head (`trl.trainer.utils.add_fused_lm_head`):
per-token log-probabilities projected in [4096 tokens x 32768 vocabulary] tiles, so the full
`(batch, seq_len, vocab)` logits never exist, and the loss is normalised by `num_items_in_batch` (the
supervised tokens of the whole accumulated batch). On CUDA/XPU with Triton it projects only the positions whose
next-token label is not -100 (`compact`). Elsewhere it projects every position, because a compiled backend
(XLA, Neuron) would recompile for each new number of positions. Eager CPU has no such constraint, so the job turns
the compact path on there too: the head then runs on the answer and its end-of-turn token only (20% of the demo's
tokens), with the same loss and gradients (tests/test_loss.py). Prompt tuning needs nothing more: peft prefixes
the labels with -100 for the virtual tokens before the head sees them.
"""

from __future__ import annotations

from typing import Any

EAGER_DEVICES = ("cpu",)
"""Devices where trl's fused head is made compact; CUDA/XPU with Triton already are."""


def supervised_positions_only() -> None:
    """Make trl's fused LM head project supervised positions only on EAGER_DEVICES too (idempotent).

    trl decides through `trl.trainer.utils._use_triton(device)`, which that module uses for this choice alone (the
    kernels import their own reference); the wrapper keeps its answer everywhere else.
    """
    import trl.trainer.utils as fused

    decide = fused._use_triton
    if getattr(decide, "supervised_only", False):
        return

    def compact(device: Any) -> bool:
        return device.type in EAGER_DEVICES or decide(device)

    compact.supervised_only = True  # type: ignore[attr-defined]
    fused._use_triton = compact
