"""Reading private JSONL training data and turning it into padded LM batches.

Each line is one record `{"input": "...", "target": "..."}`. The target is appended to the
input as is (put any separator, such as a trailing space or newline, in the data), followed by
the tokenizer's end-of-sequence token. The loss falls on the target tokens only: prompt and
padding positions carry the label -100. Error messages name the file and line but never quote
the data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from protocol.errors import InvalidArgument

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt and padding)


@dataclass(frozen=True)
class Example:
    """One training record."""

    input: str
    target: str


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + target, and labels that are -100 on the prompt."""

    input_ids: list[int]
    labels: list[int]


def read_jsonl(path: str | Path) -> list[Example]:
    """Read {"input", "target"} records; raise InvalidArgument with a one-line message."""
    file = Path(path)
    if not file.is_file():
        raise InvalidArgument(f"data file {file} does not exist: pass a JSONL file with "
                              'one {"input": ..., "target": ...} record per line', field="data")
    examples = []
    with open(file, encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    examples.append(_parse_line(file, number, line))
        except UnicodeDecodeError:
            raise InvalidArgument(f"data file {file} is not UTF-8 text", field="data") from None
    if not examples:
        raise InvalidArgument(f"data file {file} holds no records: add one JSON object per "
                              'line, e.g. {"input": "question", "target": " answer"}',
                              field="data")
    return examples


def _parse_line(file: Path, number: int, line: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        # err.msg says what is wrong without quoting the (private) line itself.
        raise InvalidArgument(f"{file} line {number}: not valid JSON ({err.msg} at column "
                              f"{err.colno})", field="data") from None
    if not isinstance(record, dict):
        raise InvalidArgument(f"{file} line {number}: expected a JSON object with \"input\" "
                              f"and \"target\", got a {type(record).__name__}", field="data")
    missing = [key for key in ("input", "target") if not isinstance(record.get(key), str)]
    if missing:
        raise InvalidArgument(f"{file} line {number}: the record needs string field(s) "
                              f"{missing}", field="data")
    if not record["target"]:
        raise InvalidArgument(f"{file} line {number}: \"target\" is empty; the loss falls on "
                              "target tokens, so each record needs a non-empty target",
                              field="data")
    return Example(input=record["input"], target=record["target"])


def tokenize(examples: list[Example], tokenizer, max_length: int) -> list[TokenizedExample]:
    """Tokenise prompt and target separately; keep the target and the end of the prompt.

    When prompt + target exceed max_length, the prompt loses tokens from its start (the end of
    a prompt matters most for the answer); a target longer than max_length is cut at its end.
    """
    if max_length < 2:
        raise InvalidArgument(f"--max-length must be at least 2, got {max_length}",
                              field="max_length")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = tokenizer([e.input for e in examples], add_special_tokens=False)["input_ids"]
    targets = tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]
    out = []
    for prompt, target in zip(prompts, targets, strict=True):
        target = (target + eos)[:max_length - 1] if target else eos
        prompt = prompt[len(prompt) - (max_length - len(target)):] \
            if len(prompt) + len(target) > max_length else prompt
        out.append(TokenizedExample(input_ids=prompt + target,
                                    labels=[IGNORE_INDEX] * len(prompt) + target))
    return out


def collate(batch: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (batch, seq)."""
    length = max(len(example.input_ids) for example in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        size = len(example.input_ids)
        ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        mask[row, :size] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[TokenizedExample], batch_size: int, pad_id: int,
            seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches: every example once per epoch, reshuffled each epoch."""
    order = list(range(len(examples)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if len(chunk) < batch_size and len(order) >= batch_size:
                continue  # keep every step's batch the same size
            yield collate([examples[i] for i in chunk], pad_id)


def one_pass(examples: list[TokenizedExample], batch_size: int,
             pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Every example exactly once, in order."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id)


def token_counts(examples: list[TokenizedExample]) -> dict[str, int]:
    """Numbers for the training summary: examples, all tokens, target (loss) tokens."""
    return {
        "examples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "target_tokens": sum(sum(1 for label in e.labels if label != IGNORE_INDEX)
                             for e in examples),
    }
