"""Batched greedy generation of SQL answers, stopping at the end-of-turn/EOS token."""

from __future__ import annotations

import sys
import time
from typing import Any

from job.data.prompts import ChatFormatter
from job.evaluation.sql_extract import extract_sql


def generation_batches(tokenizer: Any, prompts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of the prompts in each batch, longest prompts first, so each left-padded batch wastes little."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[first : first + batch_size] for first in range(0, len(order), batch_size)]


def generate_predictions(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    batch_size: int,
    max_new_tokens: int,
    label: str = "model",
) -> list[dict[str, Any]]:
    """One prediction per row, in row order: id, raw answer, extracted SQL, whether generation stopped by itself.

    Prompts are sorted by length so each left-padded batch wastes little; greedy decoding makes the result
    independent of the batching.
    """
    import torch

    formatter = ChatFormatter(tokenizer)
    prompts = [formatter.prompt(row) for row in rows]
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    results: list[dict[str, Any] | None] = [None] * len(rows)
    model.eval()
    start = time.monotonic()
    try:
        done = 0
        for batch in generation_batches(tokenizer, prompts, batch_size):
            encoded = tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            with torch.inference_mode():
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=formatter.stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for index, tokens in zip(batch, output[:, encoded["input_ids"].shape[1] :].tolist(), strict=True):
                stop_at = next((k for k, t in enumerate(tokens) if t in formatter.stop_ids), None)
                raw = tokenizer.decode(tokens[:stop_at], skip_special_tokens=True)
                results[index] = {
                    "id": rows[index]["id"],
                    "raw": raw,
                    "sql": extract_sql(raw),
                    "stopped": stop_at is not None,
                    "n_new_tokens": len(tokens) if stop_at is None else stop_at + 1,
                }
            done += len(batch)
            rate = done / max(time.monotonic() - start, 1e-9)
            print(f"{label}: generated {done}/{len(rows)} ({rate:.2f} rows/s)", file=sys.stderr, flush=True)
    finally:
        tokenizer.padding_side = previous_side
    return [r for r in results if r is not None]
