"""The task suite: every task loads well-formed examples; splits are seeded and disjoint."""

from __future__ import annotations

import pytest

from protocol.errors import InvalidArgument
from tasks import HELD_IN, HELD_OUT, RELATED, TASKS, get_task, load, split
from tasks.task import MAX_TEXT_CHARS, Example, truncate


@pytest.mark.parametrize("name", list(TASKS))
def test_task_loads_well_formed_examples(name):
    examples = load(name)
    assert len(examples) >= 200, f"{name} has only {len(examples)} examples"
    n_choices = {len(e.choices) for e in examples}
    labels = {e.label for e in examples}
    for example in examples:
        assert example.input.strip() and not example.input.endswith(" ")
        assert 0 <= example.label < len(example.choices)
        assert all(choice.strip() for choice in example.choices)
        # Prompts stay short: each long text is cut to MAX_TEXT_CHARS, plus the template.
        assert len(example.input) < 2 * MAX_TEXT_CHARS
    assert len(labels) >= 2, f"{name}: every example has the same label"
    assert min(n_choices) >= 2
    assert len({e.input for e in examples}) == len(examples), "prompts are deduplicated"


@pytest.mark.parametrize("name", list(TASKS))
def test_split_is_disjoint_and_covers_the_task(name):
    parts = split(name, seed=0)
    prompts = [{e.input for e in part} for part in (parts.train, parts.validation, parts.test)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2]
    assert not prompts[1] & prompts[2]
    assert sum(map(len, prompts)) == len(load(name))
    if len(load(name)) >= 500:
        assert len(parts.test) == 300


def test_split_depends_only_on_the_seed():
    first, again, other = split("siqa", seed=3), split("siqa", seed=3), split("siqa", seed=4)
    assert first == again
    assert [e.input for e in first.test] != [e.input for e in other.test]


def test_partition_has_enough_tasks_and_related_held_in_tasks():
    assert len(HELD_IN) >= 8 and len(HELD_OUT) >= 4
    assert not set(HELD_IN) & set(HELD_OUT)
    assert set(HELD_IN) | set(HELD_OUT) <= set(TASKS)
    for name in HELD_OUT:
        related = RELATED[name]
        assert related and set(related) <= set(HELD_IN)
        assert any(TASKS[r].family == TASKS[name].family for r in related)


def test_held_out_tasks_share_no_prompt_with_held_in_tasks():
    held_in = {e.input for name in HELD_IN for e in load(name)}
    for name in HELD_OUT:
        assert not held_in & {e.input for e in load(name)}, name


def test_unknown_task_and_split_are_refused_with_the_choices():
    with pytest.raises(InvalidArgument, match="boolq"):
        get_task("bool-q")
    with pytest.raises(InvalidArgument, match="train, validation or test"):
        split("boolq").get("dev")


def test_example_rejects_a_label_out_of_range():
    with pytest.raises(InvalidArgument, match="out of range"):
        Example("Q:", ("no", "yes"), 2)
    assert Example("Q:", ("no", "yes"), 1).record() == {"input": "Q:", "target": " yes"}


def test_truncate_cuts_at_a_word_and_collapses_whitespace():
    text = "word " * 200
    cut = truncate(text, 50)
    assert len(cut) <= 50 and cut.endswith("...") and "  " not in cut
    assert truncate("a\n b\t c") == "a b c"
