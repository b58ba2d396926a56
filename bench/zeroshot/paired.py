"""Paired comparisons between methods scored on the same examples, and label-balance figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DRAWS = 1000  # paired bootstrap resamples
SEED = 20  # the resampling seed, fixed so that the report is regenerable bit for bit


@dataclass(frozen=True)
class PairedDifference:
    """Mean-over-tasks accuracy of method a minus method b, with its paired bootstrap."""

    diff: float  # observed difference of the task-averaged accuracies
    low: float  # 2.5% quantile of the resampled differences
    high: float  # 97.5% quantile
    p_not_better: float  # share of resamples with diff <= 0


def task_draws(sizes: Mapping[str, int], draws: int = DRAWS,
               seed: int = SEED) -> dict[str, np.ndarray]:
    """Resampled example indices per task: task -> (draws, n), drawn once in task order so
    every pair of methods is compared on the very same resamples."""
    rng = np.random.default_rng(seed)
    return {task: rng.integers(0, n, size=(draws, n)) for task, n in sizes.items()}


def paired_difference(a: Mapping[str, Sequence[int]], b: Mapping[str, Sequence[int]],
                      draws: Mapping[str, np.ndarray]) -> PairedDifference:
    """a, b: task -> per-example correctness (0/1) of two methods on the same examples.

    Each resample takes the same example indices for both methods within every task (the
    tasks are fixed, the examples are the sample), then averages the per-task differences.
    """
    tasks = [t for t in a if t in b]
    if not tasks:
        raise ValueError("paired_difference needs at least one task scored by both methods")
    total = np.zeros(len(next(iter(draws.values()))))
    observed = 0.0
    for task in tasks:
        delta = np.asarray(a[task], dtype=np.float64) - np.asarray(b[task], dtype=np.float64)
        if task not in draws or draws[task].shape[1] != len(delta):
            raise ValueError(f"task {task!r}: draws do not match its {len(delta)} examples")
        total += delta[draws[task]].mean(axis=1)
        observed += delta.mean()
    total /= len(tasks)
    low, high = np.quantile(total, [0.025, 0.975])
    return PairedDifference(observed / len(tasks), float(low), float(high),
                            float(np.mean(total <= 0)))


def balanced_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Mean over the classes present in `labels` of the share of that class predicted right."""
    predicted, gold = np.asarray(predictions), np.asarray(labels)
    recalls = [float(np.mean(predicted[gold == c] == c)) for c in np.unique(gold)]
    return float(np.mean(recalls))


def majority_rate(labels: Sequence[int]) -> float:
    """Accuracy of always answering the most frequent gold label."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())
