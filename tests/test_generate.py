"""Batched generation: left padding and length sorting must not change what greedy decoding produces."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from job.evaluation.generate import generate_predictions


@pytest.fixture(scope="module")
def rows(sample_path):
    return [json.loads(line) for line in sample_path.read_text().splitlines()[:10]]


def test_batched_generation_equals_one_at_a_time(tiny_model, rows):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batched = generate_predictions(model, tokenizer, rows, batch_size=4, max_new_tokens=12)
    single = generate_predictions(model, tokenizer, rows, batch_size=1, max_new_tokens=12)
    assert [p["id"] for p in batched] == [r["id"] for r in rows]  # row order kept despite length sorting
    assert [p["raw"] for p in batched] == [p["raw"] for p in single]
    assert [p["stopped"] for p in batched] == [p["stopped"] for p in single]
    assert tokenizer.padding_side == "right"  # restored
