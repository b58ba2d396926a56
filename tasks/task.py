"""The task data types: an Example (prompt, answer choices, label) and a Task that loads them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import InvalidArgument

# Long texts are cut to about this many characters so that a prompt plus its answer stays
# around 64-128 tokens on SmolLM2 (roughly 4 characters per token).
MAX_TEXT_CHARS = 400


@dataclass(frozen=True)
class Example:
    """One rank-classification item: score each choice as a continuation of `input`."""

    input: str  # the prompt, ending where the answer starts (no trailing space)
    choices: tuple[str, ...]  # answer texts, without the leading space
    label: int  # index of the correct choice

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise InvalidArgument(f"an example needs at least 2 choices, got {self.choices!r}",
                                  field="choices")
        if not 0 <= self.label < len(self.choices):
            raise InvalidArgument(
                f"label {self.label} is out of range for {len(self.choices)} choices",
                field="label")

    @property
    def target(self) -> str:
        """The correct answer as the contributor trains on it: a space, then the choice."""
        return " " + self.choices[self.label]

    def record(self) -> dict[str, str]:
        """The JSONL record a contributor's private data file holds."""
        return {"input": self.input, "target": self.target}


@dataclass(frozen=True)
class Task:
    """A named task: where its examples come from, its kind, and how to load them."""

    name: str  # registry key, e.g. "tweet-sentiment"
    family: str  # kind of task, e.g. "sentiment", "qa-yesno", "commonsense-mc"
    source: str  # where the data lies, for humans
    loader: Callable[[], list[Example]] = field(repr=False, compare=False)

    def load(self) -> list[Example]:
        """All examples, deduplicated by prompt, in the source's order."""
        seen: set[str] = set()
        unique = []
        for example in self.loader():
            # The same prompt twice could land in both train and test; keep the first.
            if example.input not in seen:
                seen.add(example.input)
                unique.append(example)
        return unique


def truncate(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Collapse whitespace and cut at a word boundary to at most `limit` characters."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut + "..."


def write_jsonl(examples: Sequence[Example], path: Path) -> int:
    """Write `{"input", "target"}` records, one a line; returns the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.record(), ensure_ascii=False) + "\n")
    return len(examples)
