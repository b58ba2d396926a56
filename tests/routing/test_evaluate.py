"""Rank classification on the tiny model: exact scores, batching, the hook, the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.errors import InvalidArgument
from routing.evaluate import (
    ConfidenceInterval,
    EvalResult,
    bootstrap_ci,
    bootstrap_task_mean,
    choice_scores,
    evaluate,
)
from tasks import Example

EXAMPLES = [
    Example("Tweet: what a lovely day\nSentiment:", ("negative", "neutral", "positive"), 2),
    Example("Question: where do fish live?\nAnswer:", ("in the sea", "on trees"), 0),
    Example("Goal: boil water.\nSolution:", ("use a kettle", "use a fridge", "shout", "x"), 0),
    Example("Q:", ("a much longer answer with many tokens", "b"), 1),
]


def _manual_score(base, prompt: str, choice: str) -> float:
    """Mean log-prob of the choice's tokens, from one unpadded forward pass."""
    tok = base.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    choice_ids = tok(" " + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + choice_ids])
    with torch.no_grad():
        logp = torch.log_softmax(base.model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(prompt_ids)
    return float(np.mean([logp[start + i - 1, t].item() for i, t in enumerate(choice_ids)]))


@pytest.mark.parametrize("share_prompt", [True, False])
def test_scores_equal_a_direct_log_prob_computation(tiny_base, share_prompt):
    scores = choice_scores(tiny_base.model, tiny_base.tokenizer, EXAMPLES, batch_size=3,
                           share_prompt=share_prompt)
    for example, row in zip(EXAMPLES, scores, strict=True):
        expected = [_manual_score(tiny_base, example.input, c) for c in example.choices]
        assert row == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_scores_do_not_depend_on_batch_size_or_padding(tiny_base, share_prompt):
    model, tok = tiny_base.model, tiny_base.tokenizer
    one = choice_scores(model, tok, EXAMPLES, batch_size=1, share_prompt=share_prompt)
    many = choice_scores(model, tok, EXAMPLES, batch_size=64, share_prompt=share_prompt)
    np.testing.assert_allclose(np.concatenate(one), np.concatenate(many), atol=1e-5)


def _forced_example(base, prompt: str) -> Example:
    """Two one-letter answers: the letter the model likes most after the prompt, and least."""
    tok = base.tokenizer
    ids = tok(prompt + " ", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = base.model(input_ids=torch.tensor([ids])).logits[0, -1]
    letters = {tok.convert_tokens_to_ids(ch): ch for ch in "abcdefghijklmnopqrstuvwxyz"}
    ranked = sorted(letters, key=lambda i: logits[i].item())
    # " x" is the space token then the letter: the shared space token cannot decide.
    return Example(prompt, (letters[ranked[0]], letters[ranked[-1]]), 1)


def test_the_choice_the_model_prefers_is_predicted(tiny_base):
    forced = [_forced_example(tiny_base, p) for p in ("Say a letter:", "Pick one", "Next:")]
    result = evaluate(tiny_base.model, tiny_base.tokenizer, forced, progress=False)
    assert result.predictions == [1, 1, 1] and result.accuracy == 1.0
    flipped = [Example(e.input, e.choices, 0) for e in forced]
    assert evaluate(tiny_base.model, tiny_base.tokenizer, flipped, progress=False).accuracy == 0


def test_accuracy_counts_matches_between_predictions_and_labels(tiny_base):
    result = evaluate(tiny_base.model, tiny_base.tokenizer, EXAMPLES, progress=False)
    assert result.predictions == [int(np.argmax(s)) for s in result.scores]
    assert result.accuracy == pytest.approx(np.mean(result.correct))
    assert result.seconds > 0
    rigged = EvalResult(result.scores, [0, 1, 1, 0], [0, 1, 0, 1], result.seconds)
    assert rigged.accuracy == 0.5 and rigged.correct == [True, True, False, False]


def _hook_events(base, share_prompt: bool) -> tuple[list[list[int]], list]:
    events: list = []
    handle = base.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: events.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    try:
        choice_scores(base.model, base.tokenizer, EXAMPLES, batch_size=3,
                      share_prompt=share_prompt,
                      before_batch=lambda rows: events.append(list(rows)))
    finally:
        handle.remove()
    hooks, forwards = events[0::2], events[1::2]
    assert all(isinstance(f, tuple) for f in forwards) and len(hooks) == len(forwards)
    # Each hook names exactly the rows of the forward that follows it.
    assert [len(h) for h in hooks] == [shape[0] for shape in forwards]
    return hooks, forwards


def test_before_batch_names_every_row_before_its_forward(tiny_base):
    hooks, _ = _hook_events(tiny_base, share_prompt=False)
    rows = sorted(i for batch in hooks for i in batch)
    assert rows == sorted(i for i, e in enumerate(EXAMPLES) for _ in e.choices)
    # A batch keeps an example's choices together, so only a lone example may exceed 3 rows.
    assert all(len(batch) <= 3 or len(set(batch)) == 1 for batch in hooks)


def test_before_batch_with_shared_prompts_names_prompts_then_choices(tiny_base):
    hooks, _ = _hook_events(tiny_base, share_prompt=True)
    prompts, choices = hooks[0::2], hooks[1::2]
    assert sorted(i for batch in prompts for i in batch) == list(range(len(EXAMPLES)))
    assert sorted(i for batch in choices for i in batch) == sorted(
        i for i, e in enumerate(EXAMPLES) for _ in e.choices)
    for prompt_rows, choice_rows in zip(prompts, choices, strict=True):
        assert set(choice_rows) == set(prompt_rows)


def test_long_prompts_are_cut_from_the_left_to_fit(tiny_base):
    long = Example("filler " * 100 + "Answer:", ("yes", "no"), 0)
    shared = choice_scores(tiny_base.model, tiny_base.tokenizer, [long], max_length=32)
    rowwise = choice_scores(tiny_base.model, tiny_base.tokenizer, [long], max_length=32,
                            share_prompt=False)
    # Byte-level tokens: " yes" is 4 of them, so 28 prompt characters are kept.
    tail = long.input[-(32 - 4):]
    expected = [_manual_score(tiny_base, tail, c) for c in long.choices]
    assert shared[0] == pytest.approx(expected, abs=1e-5)
    assert rowwise[0] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(InvalidArgument, match="batch_size"):
        choice_scores(tiny_base.model, tiny_base.tokenizer, [long], batch_size=0)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    small = bootstrap_ci([1, 0] * 50)
    large = bootstrap_ci([1, 0] * 2000)
    assert small.low < 0.5 == small.mean < small.high
    assert 0.1 < small.high - small.low < 0.3
    assert large.high - large.low < (small.high - small.low) / 4
    assert bootstrap_ci([1, 0] * 50, seed=7) == bootstrap_ci([1, 0] * 50, seed=7)
    assert bootstrap_ci([1.0] * 30) == ConfidenceInterval(1.0, 1.0, 1.0)


def test_task_mean_weights_tasks_equally_not_examples():
    interval = bootstrap_task_mean({"a": [1] * 10, "b": [0] * 90 + [1] * 10})
    assert interval.mean == pytest.approx(0.55)
    assert interval.low < 0.55 < interval.high
    assert bootstrap_task_mean({"a": [1, 1], "b": [0, 0]}) == ConfidenceInterval(0.5, 0.5, 0.5)
    with pytest.raises(InvalidArgument):
        bootstrap_task_mean({"a": []})


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_shared_prompts_match_full_sequences_on_smollm2():
    """On the real model (BPE merges, grouped-query attention), both paths agree."""
    from routing.base import load_base
    from tasks import split

    base = load_base("smollm2-135m")
    examples = split("xsum-summary").test[:4] + split("siqa").test[:4]
    shared = choice_scores(base.model, base.tokenizer, examples, batch_size=4)
    rowwise = choice_scores(base.model, base.tokenizer, examples, batch_size=4,
                            share_prompt=False)
    np.testing.assert_allclose(np.concatenate(shared), np.concatenate(rowwise), atol=1e-4)
