"""Rank classification: score each answer choice by its mean token log-likelihood, pick the best.

Works on any causal LM whose forward takes `input_ids` and `attention_mask` and returns logits
(a Hugging Face model, or a routed model that keeps that signature). By default each prompt
runs once and its key/value cache serves all its choices (3-5x fewer tokens on classification
tasks); `share_prompt=False` runs one full sequence per (example, choice) instead. Batches are
right-padded. The prompt and the choice are tokenised separately and their ids concatenated,
so that a merge across the boundary cannot move tokens from the choice into the prompt.
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

# Called before every forward with the example index of each row, in row order: lets a caller
# set per-example routing inputs. With a shared prompt there are two forwards per batch: the
# prompts (one row per example), then the choices (one row per choice, indices repeat).
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
class _Encoded:
    example: int  # index into the evaluated examples
    prompt: list[int]  # prompt ids, cut from the left so the longest choice fits max_length
    choices: list[list[int]]  # ids of " " + choice, each non-empty


def _encode(tokenizer, examples: Sequence[ChoiceExample], max_length: int) -> list[_Encoded]:
    """Prompt and choices tokenised separately; the prompt loses its start if too long."""
    encoded = []
    for i, example in enumerate(examples):
        # No special tokens, exactly as the contributor's training tokenises its prompts.
        prompt = list(tokenizer(example.input, add_special_tokens=False)["input_ids"])
        if not prompt:  # the first choice token needs something to be predicted from
            prompt = [tokenizer.bos_token_id or tokenizer.eos_token_id]
        # The answer follows the prompt after one space, as the contributors train it.
        choices = [list(tokenizer(" " + c, add_special_tokens=False)["input_ids"])[
            : max_length - 1] for c in example.choices]
        keep = max_length - max(len(c) for c in choices)
        encoded.append(_Encoded(i, prompt[-keep:], choices))
    return encoded


def _right_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask, both (len(sequences), longest), padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, sequence in enumerate(sequences):
        ids[r, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[r, : len(sequence)] = 1
    return ids, mask


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _gather_logp(logits: torch.Tensor, rows: list[int], positions: list[int],
                 targets: list[int]) -> torch.Tensor:
    """log p(targets[i]) at logits[rows[i], positions[i]]; log_softmax only where needed.

    logits: (batch, seq, vocab) -> (len(targets),)
    """
    device = logits.device
    picked = logits[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
    logp = torch.log_softmax(picked.float(), dim=-1)
    return logp.gather(1, torch.tensor(targets, device=device).unsqueeze(1)).squeeze(1)


def _means(token_logp: torch.Tensor, owners: list[int], n_rows: int) -> list[float]:
    """Mean of token_logp per owner row: (tokens,) -> n_rows floats."""
    owner = torch.tensor(owners, device=token_logp.device)
    sums = torch.zeros(n_rows, dtype=torch.float64, device=token_logp.device)
    sums.index_add_(0, owner, token_logp.double())
    counts = torch.zeros(n_rows, dtype=torch.float64, device=token_logp.device)
    counts.index_add_(0, owner, torch.ones_like(token_logp, dtype=torch.float64))
    return (sums / counts).cpu().tolist()


def _score_rowwise(model: nn.Module, batch: Sequence[_Encoded], pad_id: int,
                   device: torch.device, before_batch: BeforeBatch | None) -> list[list[float]]:
    """One full sequence per (example, choice): input_ids (rows, prompt + choice)."""
    sequences, rows, positions, targets, examples = [], [], [], [], []
    for item in batch:
        for choice in item.choices:
            r = len(sequences)
            sequences.append(item.prompt + choice)
            examples.append(item.example)
            start = len(item.prompt)
            # The logit at position t predicts the token at t + 1.
            rows.extend([r] * len(choice))
            positions.extend(range(start - 1, start - 1 + len(choice)))
            targets.extend(choice)
    if before_batch is not None:
        before_batch(examples)
    ids, mask = _right_pad(sequences, pad_id)
    logits = _logits(model(input_ids=ids.to(device), attention_mask=mask.to(device)))
    flat = _means(_gather_logp(logits, rows, positions, targets), rows, len(sequences))
    return _regroup(flat, batch)


def _score_shared(model: nn.Module, batch: Sequence[_Encoded], pad_id: int,
                  device: torch.device, before_batch: BeforeBatch | None) -> list[list[float]]:
    """Each prompt runs once; its key/value cache is copied to every one of its choices.

    Pass 1: prompts (examples, P) with use_cache; the logit at a prompt's last token scores
    every choice's first token. Pass 2 (only for choices of 2+ tokens): see `_choice_pass`.
    """
    if before_batch is not None:
        before_batch([item.example for item in batch])
    ids, mask = _right_pad([item.prompt for item in batch], pad_id)
    output = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
    owner_of_row = [b for b, item in enumerate(batch) for _ in item.choices]
    choices = [choice for item in batch for choice in item.choices]
    last = [len(batch[b].prompt) - 1 for b in owner_of_row]
    token_logp = [_gather_logp(_logits(output), owner_of_row, last, [c[0] for c in choices])]
    owners = list(range(len(choices)))
    if any(len(choice) > 1 for choice in choices):
        if before_batch is not None:
            before_batch([batch[b].example for b in owner_of_row])
        logp, rows = _choice_pass(model, output, mask, batch, owner_of_row, choices, pad_id)
        token_logp.append(logp)
        owners.extend(rows)
    flat = _means(torch.cat(token_logp), owners, len(choices))
    return _regroup(flat, batch)


def _choice_pass(model: nn.Module, output, prompt_mask: torch.Tensor,
                 batch: Sequence[_Encoded], owner_of_row: list[int],
                 choices: list[list[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Feed every choice but its last token, (rows, C), on its prompt's copied cache.

    The mask covers [prompt (P), choice (C)] and positions continue each prompt's own length,
    so right padding inside the cache changes nothing. Returns the log-probs of the choices'
    tokens after the first, and the row each belongs to.
    """
    cache = getattr(output, "cache", None)
    if cache is None:
        raise InvalidArgument(
            "the model returned no key/value cache, so prompts cannot be shared across "
            "choices: evaluate with share_prompt=False", field="share_prompt")
    device = _model_device(model)
    cache.reorder_cache(torch.tensor(owner_of_row, device=device))
    rest = [choice[:-1] for choice in choices]  # the last token is only ever predicted
    choice_ids, choice_mask = _right_pad([r or [pad_id] for r in rest], pad_id)
    choice_mask[[r for r, seq in enumerate(rest) if not seq]] = 0
    full_mask = torch.cat([prompt_mask[owner_of_row], choice_mask], dim=1)
    offsets = torch.tensor([len(batch[b].prompt) for b in owner_of_row]).unsqueeze(1)
    position_ids = offsets + torch.arange(choice_ids.shape[1]).unsqueeze(0)
    logits = _logits(model(input_ids=choice_ids.to(device), attention_mask=full_mask.to(device),
                           position_ids=position_ids.to(device), cache=cache, use_cache=True))
    rows = [r for r, choice in enumerate(choices) for _ in choice[1:]]
    positions = [j for choice in choices for j in range(len(choice) - 1)]
    targets = [t for choice in choices for t in choice[1:]]
    return _gather_logp(logits, rows, positions, targets), rows


def _regroup(flat: list[float], batch: Sequence[_Encoded]) -> list[list[float]]:
    """Row scores in batch order -> one list of choice scores per example."""
    grouped, start = [], 0
    for item in batch:
        grouped.append(flat[start:start + len(item.choices)])
        start += len(item.choices)
    return grouped


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def choice_scores(model: nn.Module, tokenizer, examples: Sequence[ChoiceExample], *,
                  batch_size: int = 16, max_length: int = 256, share_prompt: bool = True,
                  before_batch: BeforeBatch | None = None, progress: bool = False,
                  desc: str = "eval") -> list[list[float]]:
    """Mean log-likelihood of every choice of every example: [example][choice].

    share_prompt: run each prompt once and reuse its key/value cache for its choices (needs a
    forward that takes `cache`, `position_ids` and `use_cache`, as transformers 5 causal
    LMs do); otherwise one full sequence per (example, choice). Both give the same
    scores. `batch_size` counts sequences per forward: prompts when shared, else
    (example, choice) rows. Examples are sorted by length so a batch pads little.
    """
    if batch_size < 1 or max_length < 2:
        raise InvalidArgument(
            f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}",
            field="batch_size")
    from tqdm.auto import tqdm

    encoded = sorted(_encode(tokenizer, examples, max_length),
                     key=lambda item: -len(item.prompt) - max(map(len, item.choices)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _model_device(model)
    score = _score_shared if share_prompt else _score_rowwise
    scores: list[list[float]] = [[] for _ in examples]
    with torch.inference_mode(), tqdm(total=len(encoded), desc=desc, unit="example",
                                      disable=not progress, leave=False) as bar:
        for batch in _batches(encoded, batch_size, share_prompt):
            for item, values in zip(batch, score(model, batch, pad_id, device, before_batch),
                                    strict=True):
                scores[item.example] = values
            bar.update(len(batch))
    return scores


def _batches(encoded: list[_Encoded], batch_size: int, share_prompt: bool):
    """Consecutive groups holding at most batch_size sequences (at least one example)."""
    batch: list[_Encoded] = []
    used = 0
    for item in encoded:
        size = 1 if share_prompt else len(item.choices)
        if batch and used + size > batch_size:
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += size
    if batch:
        yield batch


def evaluate(model: nn.Module, tokenizer, examples: Sequence[ChoiceExample], *,
             batch_size: int = 16, max_length: int = 256, share_prompt: bool = True,
             before_batch: BeforeBatch | None = None, progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Rank-classify `examples`: predictions, labels, per-choice scores and accuracy."""
    began = time.perf_counter()
    scores = choice_scores(model, tokenizer, examples, batch_size=batch_size,
                           max_length=max_length, share_prompt=share_prompt,
                           before_batch=before_batch,
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
