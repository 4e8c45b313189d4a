"""Evaluation split across the processes of a multi-process run: each generates for its share of the rows, and
rank 0 gets every prediction back in row order.

A share is made of whole generation batches: the rows sorted by prompt length and cut every `batch_size`, as
one process would batch them (job.evaluation.generate), dealt round-robin to the ranks. Each row is therefore
generated in the same left-padded batch as in a single-process evaluation, so the predictions, and the metrics
computed from them, are the same. One process (or no process group): every row, nothing exchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from job.data.prompts import ChatFormatter
from job.evaluation.generate import generation_batches
from job.train import distributed


def _batches(rows: list[dict[str, Any]], tokenizer: Any, batch_size: int) -> list[list[int]]:
    """Row indices of each batch a single process generates, in its order."""
    formatter = ChatFormatter(tokenizer)
    return generation_batches(tokenizer, [formatter.prompt(row) for row in rows], batch_size)


def my_share(rows: list[dict[str, Any]], tokenizer: Any, batch_size: int) -> list[int]:
    """Indices of the rows this rank generates for: every `world_size`-th batch, starting at its rank."""
    if not distributed.active() or not rows:
        return list(range(len(rows)))
    batches = _batches(rows, tokenizer, batch_size)
    return [index for batch in batches[distributed.rank() :: distributed.world_size()] for index in batch]


def generate_sharded(
    generate: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    rows: list[dict[str, Any]],
    tokenizer: Any,
    batch_size: int,
) -> list[dict[str, Any]] | None:
    """`generate(rows)` run by every rank on its share; on rank 0 all predictions in row order, elsewhere None.
    Every rank must call it (the predictions are gathered with a collective)."""
    share = my_share(rows, tokenizer, batch_size)
    predictions = generate([rows[i] for i in share]) if share else []  # fewer batches than ranks
    gathered = distributed.gather_all(list(zip(share, predictions, strict=True)))
    if not distributed.is_main():
        return None
    ordered: list[dict[str, Any] | None] = [None] * len(rows)
    for pairs in gathered:
        for index, prediction in pairs:
            ordered[index] = prediction
    missing = [rows[i]["id"] for i, p in enumerate(ordered) if p is None]
    if missing:
        raise RuntimeError(f"sharded evaluation lost {len(missing)} rows (first: {missing[0]!r})")
    return ordered  # type: ignore[return-value]
