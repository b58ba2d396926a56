"""JSONL reading (one-line errors naming the line) and tokenisation with target-only loss."""

from __future__ import annotations

import json

import pytest

from contributor.data import IGNORE_INDEX, Example, collate, read_jsonl, token_counts, tokenize
from protocol.errors import InvalidArgument


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_records_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"input": "a", "target": " b"}), "",
                                         json.dumps({"input": "c", "target": " d", "x": 1})])
    assert read_jsonl(path) == [Example("a", " b"), Example("c", " d")]


@pytest.mark.parametrize("lines, expected", [
    ([], "holds no records"),
    (["", "   "], "holds no records"),
    ([json.dumps({"input": "a", "target": "b"}), "{not json"], "line 2: not valid JSON"),
    (["[1, 2]"], "line 1: expected a JSON object"),
    ([json.dumps({"input": "a"})], "line 1: the record needs string field(s) ['target']"),
    ([json.dumps({"target": "a"})], "line 1: the record needs string field(s) ['input']"),
    ([json.dumps({"input": 3, "target": "a"})], "needs string field(s) ['input']"),
    ([json.dumps({"input": "a", "target": ""})], "line 1: \"target\" is empty"),
])
def test_bad_records_give_one_line_errors(tmp_path, lines, expected):
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(InvalidArgument) as info:
        read_jsonl(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_errors_never_quote_the_data(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"input": "SECRET-VALUE", "target": '])
    with pytest.raises(InvalidArgument) as info:
        read_jsonl(path)
    assert "SECRET" not in str(info.value)


def test_loss_falls_on_target_tokens_only(tiny_base):
    tokenizer = tiny_base.tokenizer
    [example] = tokenize([Example("prompt here", " yes")], tokenizer, max_length=64)
    prompt = tokenizer("prompt here", add_special_tokens=False)["input_ids"]
    target = tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example.input_ids == prompt + target
    assert example.labels == [IGNORE_INDEX] * len(prompt) + target


def test_truncation_keeps_target_and_end_of_prompt(tiny_base):
    tokenizer = tiny_base.tokenizer
    [example] = tokenize([Example("x" * 50 + "END", " ok")], tokenizer, max_length=10)
    assert len(example.input_ids) == 10
    kept = [t for t, label in zip(example.input_ids, example.labels, strict=True)
            if label == IGNORE_INDEX]
    assert tokenizer.decode(kept).endswith("END")
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]).startswith(" ok")


def test_collate_pads_right_and_masks_padding(tiny_base):
    tokenizer = tiny_base.tokenizer
    examples = tokenize([Example("a", " b"), Example("longer prompt", " c")], tokenizer, 64)
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, :short].all() and not batch["attention_mask"][0, short:].any()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    counts = token_counts(examples)
    assert counts["examples"] == 2
    assert counts["tokens"] == int(batch["attention_mask"].sum())
    assert counts["target_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())
