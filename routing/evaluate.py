"""Rank classification: score each answer choice by its mean token log-likelihood, pick the best.

Works on any causal LM whose forward takes `input_ids` and `attention_mask` and returns logits
(a Hugging Face model, or a routed model that keeps that signature). Each (example, choice)
pair is one row; rows are batched with right padding. The prompt and the choice are tokenised
separately and their ids concatenated, so that a merge across the boundary cannot move tokens
from the choice into the prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from protocol.errors import InvalidArgument

# Called before each forward with the example index of every row, in row order (rows of the
# same example repeat its index): lets a caller set per-example routing inputs.
BeforeBatch = Callable[[list[int]], None]


class ChoiceExample(Protocol):
    """What evaluation needs of an example (tasks.Example satisfies it)."""

    input: str
    choices: Sequence[str]
    label: int


@dataclass(frozen=True)
class EvalResult:
    """Per-example choice scores and predictions for one list of examples."""

    scores: list[list[float]]  # [example][choice]: mean log-prob of the choice's tokens
    predictions: list[int]  # argmax of each example's scores (the first on a tie)
    labels: list[int]
    seconds: float  # wall time of the scoring

    @property
    def correct(self) -> list[bool]:
        return [p == y for p, y in zip(self.predictions, self.labels, strict=True)]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.labels else float("nan")


@dataclass(frozen=True)
class ConfidenceInterval:
    """A mean with its percentile-bootstrap interval."""

    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class _Row:
    example: int  # index into the evaluated examples
    choice: int  # index into that example's choices
    ids: list[int]  # prompt ids followed by choice ids
    n_choice: int  # how many of the trailing ids belong to the choice


def _encode(tokenizer, examples: Sequence[ChoiceExample], max_length: int) -> list[_Row]:
    """One row per (example, choice); the prompt is cut from the left if a row is too long."""
    rows = []
    for i, example in enumerate(examples):
        # No special tokens, exactly as the contributor's training tokenises its prompts.
        prompt = list(tokenizer(example.input, add_special_tokens=False)["input_ids"])
        if not prompt:  # the first choice token needs something to be predicted from
            prompt = [tokenizer.bos_token_id or tokenizer.eos_token_id]
        for j, choice in enumerate(example.choices):
            # The answer follows the prompt after one space, as the contributors train it.
            ids = list(tokenizer(" " + choice, add_special_tokens=False)["input_ids"])
            ids = ids[: max_length - 1]
            keep = prompt[-(max_length - len(ids)):]
            rows.append(_Row(i, j, keep + ids, len(ids)))
    return rows


def _forward_logits(model: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    return output.logits if hasattr(output, "logits") else output[0]


def _score_rows(model: nn.Module, rows: Sequence[_Row], pad_id: int,
                device: torch.device) -> list[float]:
    """Mean log-prob of each row's choice tokens.

    input_ids, attention_mask: (rows, max_len), right-padded; logits: (rows, max_len, vocab).
    Only the positions predicting choice tokens go through log_softmax: (choice_tokens, vocab).
    """
    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    row_index, positions, targets = [], [], []
    for r, row in enumerate(rows):
        input_ids[r, : len(row.ids)] = torch.tensor(row.ids)
        attention_mask[r, : len(row.ids)] = 1
        start = len(row.ids) - row.n_choice
        # The logit at position t predicts the token at t + 1.
        positions.extend(range(start - 1, len(row.ids) - 1))
        targets.extend(row.ids[start:])
        row_index.extend([r] * row.n_choice)
    logits = _forward_logits(model, input_ids.to(device), attention_mask.to(device))
    rows_t = torch.tensor(row_index, device=logits.device)
    picked = logits[rows_t, torch.tensor(positions, device=logits.device)].float()
    token_logp = torch.log_softmax(picked, dim=-1).gather(
        1, torch.tensor(targets, device=logits.device).unsqueeze(1)).squeeze(1)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=logits.device)
    sums.index_add_(0, rows_t, token_logp.double())
    counts = torch.tensor([row.n_choice for row in rows], dtype=torch.float64)
    return (sums.cpu() / counts).tolist()


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def choice_scores(model: nn.Module, tokenizer, examples: Sequence[ChoiceExample], *,
                  batch_size: int = 16, max_length: int = 256,
                  before_batch: BeforeBatch | None = None, progress: bool = False,
                  desc: str = "eval") -> list[list[float]]:
    """Mean log-likelihood of every choice of every example: [example][choice].

    `batch_size` counts (example, choice) rows per forward. Rows are sorted by length so that
    a batch holds sequences of similar length (less padding).
    """
    if batch_size < 1 or max_length < 2:
        raise InvalidArgument(
            f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}",
            field="batch_size")
    from tqdm.auto import tqdm

    rows = _encode(tokenizer, examples, max_length)
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k].ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _model_device(model)
    scores: list[list[float]] = [[0.0] * len(e.choices) for e in examples]
    with torch.inference_mode(), tqdm(total=len(rows), desc=desc, unit="choice",
                                      disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = [rows[k] for k in order[start:start + batch_size]]
            if before_batch is not None:
                before_batch([row.example for row in batch])
            for row, value in zip(batch, _score_rows(model, batch, pad_id, device),
                                  strict=True):
                scores[row.example][row.choice] = value
            bar.update(len(batch))
    return scores


def evaluate(model: nn.Module, tokenizer, examples: Sequence[ChoiceExample], *,
             batch_size: int = 16, max_length: int = 256,
             before_batch: BeforeBatch | None = None, progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Rank-classify `examples`: predictions, labels, per-choice scores and accuracy."""
    began = time.perf_counter()
    scores = choice_scores(model, tokenizer, examples, batch_size=batch_size,
                           max_length=max_length, before_batch=before_batch,
                           progress=progress, desc=desc)
    predictions = [int(np.argmax(row)) for row in scores]
    return EvalResult(scores=scores, predictions=predictions,
                      labels=[int(e.label) for e in examples],
                      seconds=time.perf_counter() - began)


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95,
                 n_resamples: int = 2000, seed: int = 0) -> ConfidenceInterval:
    """Mean of `values` (e.g. 0/1 correctness) with a percentile bootstrap interval."""
    return bootstrap_task_mean({"": values}, confidence=confidence,
                               n_resamples=n_resamples, seed=seed)


def bootstrap_task_mean(per_task: Mapping[str, Sequence[float]], *, confidence: float = 0.95,
                        n_resamples: int = 2000, seed: int = 0) -> ConfidenceInterval:
    """Mean over tasks of each task's mean, with a bootstrap interval.

    Each resample draws every task's examples with replacement, independently per task, and
    averages the task means: the tasks are fixed, the examples are the sample.
    """
    if not per_task or any(len(v) == 0 for v in per_task.values()):
        raise InvalidArgument("bootstrap needs at least one task, each with values",
                              field="values")
    if not 0 < confidence < 1:
        raise InvalidArgument(f"confidence must lie in (0, 1), got {confidence}",
                              field="confidence")
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(v, dtype=np.float64) for v in per_task.values()]
    means = np.zeros(n_resamples)
    for values in arrays:
        draws = rng.integers(0, len(values), size=(n_resamples, len(values)))
        means += values[draws].mean(axis=1)
    means /= len(arrays)
    tail = (1 - confidence) / 2
    point = float(np.mean([v.mean() for v in arrays]))
    low, high = np.quantile(means, [tail, 1 - tail])
    return ConfidenceInterval(point, float(low), float(high))
