"""Data pipeline: loading local files, validation by reason, deterministic disjoint splits, length filtering."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from job.config import load_config
from job.data.prepare import prepare, summary, write_prepared
from job.data.sources import load_splits
from job.errors import ConfigError


def _rows(sample_path, n=None):
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()]
    return rows[:n] if n else rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(source, *overrides):
    return load_config("gemma-2b-it-qlora", [f"data.source={source}", *overrides], environ={})


def _content(row):
    return (row["sql_prompt"], row["sql_context"])


def test_single_split_is_carved_deterministically_and_disjointly(sample_path):
    first = load_splits(_cfg(sample_path, "data.max_eval_rows=30").data)
    again = load_splits(_cfg(sample_path, "data.max_eval_rows=30").data)
    other_seed = load_splits(_cfg(sample_path, "data.max_eval_rows=30", "data.seed=7").data)
    assert first.eval_carved
    assert len(first.eval) == 30 and len(first.train) == 370
    assert [r["id"] for r in first.eval] == [r["id"] for r in again.eval]
    assert [r["id"] for r in first.train] == [r["id"] for r in again.train]
    assert [r["id"] for r in other_seed.eval] != [r["id"] for r in first.eval]
    assert not {r["id"] for r in first.train} & {r["id"] for r in first.eval}
    assert not {_content(r) for r in first.train} & {_content(r) for r in first.eval}
    report = first.reports["train"]
    assert report.loaded == report.kept + sum(report.dropped.values())


def test_max_rows_sample_and_keep_eval_stable(sample_path):
    small = load_splits(_cfg(sample_path, "data.max_eval_rows=20", "data.max_train_rows=50").data)
    full = load_splits(_cfg(sample_path, "data.max_eval_rows=20").data)
    assert len(small.train) == 50 and small.reports["train"].dropped["not_sampled"] == 330
    assert [r["id"] for r in small.eval] == [r["id"] for r in full.eval]


def test_two_split_folder_drops_train_rows_that_leak_into_eval(tmp_path, sample_path):
    rows = _rows(sample_path, 60)
    folder = tmp_path / "gretel"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", rows[:50])
    leaked = {**rows[0], "id": 999_999}  # same question and schema as a train row, other id
    _write_jsonl(folder / "test.jsonl", [*rows[50:], leaked])
    splits = load_splits(_cfg(folder, "data.max_eval_rows=100").data)
    assert not splits.eval_carved
    assert len(splits.eval) == 11
    assert splits.reports["train"].dropped["overlaps_eval"] == 1
    assert rows[0]["id"] not in {r["id"] for r in splits.train}
    assert len(splits.train) == 49


def test_malformed_rows_are_counted_by_reason_and_skipped(tmp_path, sample_path):
    good = _rows(sample_path, 20)
    bad = [
        {k: v for k, v in good[0].items() if k != "sql"} | {"id": 1},
        {**good[1], "id": 2, "sql_prompt": "   "},
        {**good[2], "id": 3, "sql_context": None},
        {**good[3]},  # exact duplicate
        {**good[4], "id": 5, "sql": ""},
    ]
    path = _write_jsonl(tmp_path / "rows.jsonl", good + bad)
    splits = load_splits(_cfg(path, "data.eval_fraction=0.25").data)
    dropped = splits.reports["train"].dropped
    assert dropped["missing_sql"] == 1
    assert dropped["empty_sql_prompt"] == 1
    assert dropped["missing_sql_context"] == 1
    assert dropped["duplicate"] == 1
    assert dropped["empty_sql"] == 1
    assert len(splits.train) + len(splits.eval) == 20


def test_a_source_where_every_row_is_bad_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"id": i, "sql_prompt": "q", "sql": ""} for i in range(5)])
    with pytest.raises(ConfigError, match="no usable"):
        load_splits(_cfg(path).data)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_parquet_and_csv_sources(tmp_path, sample_path, fmt):
    import datasets

    dataset = datasets.Dataset.from_list(_rows(sample_path, 40))
    path = tmp_path / f"rows.{fmt}"
    getattr(dataset, f"to_{fmt}")(str(path))
    splits = load_splits(_cfg(path).data)
    assert len(splits.train) + len(splits.eval) == 40


def test_missing_source_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_splits(_cfg(tmp_path / "nope.jsonl").data)


def test_prepare_drops_long_rows_without_truncating_and_reports(tmp_path, sample_path, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = _cfg(sample_path, "training.max_seq_len=300", "data.max_eval_rows=40")
    prepared = prepare(cfg, tokenizer)
    train = prepared.stats["splits"]["train"]
    assert train["dropped"]["too_long"] > 0
    assert train["loaded"] == train["kept"] + sum(train["dropped"].values())
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for ids, labels in zip(prepared.train_features["input_ids"], prepared.train_features["labels"], strict=True):
        assert len(ids) <= 300
        assert ids[-1] == end_of_turn and labels[-1] == end_of_turn  # nothing was cut mid-answer
    assert prepared.stats["tokens"]["train"]["total"]["max"] > 300  # the long rows were measured, then dropped

    write_prepared(prepared, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    examples = [json.loads(x) for x in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    assert stats["splits"]["eval"]["kept"] == 40
    assert len(examples) == 3 and all(e["text"].endswith("<end_of_turn>") for e in examples)
    text = summary(prepared)
    assert "too_long" in text and "train" in text and "eval" in text


def test_s3_source_is_cached_under_the_one_cache_root(s3_client, s3_bucket, sample_path, tmp_path, monkeypatch):
    from job.data.sources import load_source

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    s3_client.upload_file(str(sample_path), s3_bucket, "data/rows.jsonl")
    splits = load_source(f"s3://{s3_bucket}/data/rows.jsonl")
    assert sum(len(split) for split in splits.values()) == 400
    cached = [p for p in (tmp_path / "cache" / "data").rglob("*.jsonl")]
    assert cached and cached[0].read_bytes() == sample_path.read_bytes()
