"""Scoring every method on every task with rank classification (routing.evaluate).

One base model serves every method in turn: `route` swaps the adapted linears in place and
`unroute` puts the base back. Per-example methods get their inputs through the evaluation's
`before_batch` hook: retrieval an expert index per example, SMEAR a mask over the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bench.zeroshot.config import Plan
from bench.zeroshot.retrieval import Encoder, RetrievalIndex
from protocol.bundle import Bundle
from routing.base import BaseModel
from routing.evaluate import EvalResult, _encode, evaluate
from routing.router import route, routing_inputs, unroute
from routing.stack import RouterWeights
from tasks.task import Example

Progress = Callable[[str], None]


@dataclass
class Collection:
    """Everything the methods route with."""

    weights: RouterWeights  # the exported router version (held-in experts)
    multitask: Bundle  # the privileged multitask LoRA
    retrieval: RetrievalIndex  # the privileged example embeddings
    encoder: Encoder  # embeds retrieval queries


class Scorer:
    """Runs each method over a dict of task -> test examples; results[method][task]."""

    def __init__(self, base: BaseModel, collection: Collection, plan: Plan,
                 progress: Progress = print) -> None:
        self.base, self.collection, self.plan, self.progress = base, collection, plan, progress

    def _evaluate(self, examples: Sequence[Example], desc: str, **kwargs) -> EvalResult:
        return evaluate(self.base.model, self.base.tokenizer, examples,
                        batch_size=self.plan.eval_batch_size,
                        max_length=self.plan.eval_max_length, progress=False, desc=desc,
                        **kwargs)

    def run(self, method: str, tests: dict[str, list[Example]]) -> dict[str, EvalResult]:
        """Accuracy of `method` on every task it applies to (oracle: held-in tasks only)."""
        results: dict[str, EvalResult] = {}
        weights = self.collection.weights
        if method in ("phatgoose", "arrow", "average_activation", "uniform_merge"):
            route(self.base, weights, method=method, top_k=2)
        elif method == "multitask":
            route(self.base, [self.collection.multitask], method="single:multitask")
        elif method in ("smear", "retrieval"):
            route(self.base, weights, method=method)
        for task, examples in tests.items():
            if method == "oracle":
                if task not in weights.experts:
                    continue  # held-out: no expert of its own exists
                route(self.base, weights, method=f"single:{task}")
            desc = f"{method}/{task}"
            if method == "retrieval":
                results[task] = self._retrieval(examples, desc)
            elif method == "smear":
                results[task] = self._smear(examples, desc)
            else:
                results[task] = self._evaluate(examples, desc)
            self.progress(f"{desc}: {results[task].accuracy:.3f} ({len(examples)} examples, "
                          f"{results[task].seconds:.0f} s)")
        unroute(self.base.model)
        return results

    def _retrieval(self, examples: Sequence[Example], desc: str) -> EvalResult:
        """Whole model, one expert per example: the one nearest to the prompt's embedding."""
        names = self.collection.retrieval.nearest(
            self.collection.encoder.embed([e.input for e in examples]))
        chosen = torch.tensor([self.collection.weights.expert_index(n) for n in names])
        with routing_inputs(self.base.model) as state:
            def pick(rows: list[int]) -> None:
                state.expert_index = chosen[rows]

            return self._evaluate(examples, desc, before_batch=pick)

    def _smear(self, examples: Sequence[Example], desc: str) -> EvalResult:
        """SMEAR-style: the merge weights come from the mean activation over the prompt.

        Every (example, choice) row runs in full (no shared prompt cache), with a routing mask
        over the prompt's positions only: each choice is scored by the same merged expert,
        chosen from the input alone, as SMEAR routes on the input sequence.
        """
        hook = PromptMask(self.base.tokenizer, examples, self.plan.eval_max_length)
        with routing_inputs(self.base.model) as state:
            def mask(rows: list[int]) -> None:
                state.attention_mask = hook.mask(rows)

            return self._evaluate(examples, desc, before_batch=mask, share_prompt=False)


class PromptMask:
    """Masks over the prompt positions of row-wise evaluation batches (see routing.evaluate).

    Row-wise batches hold each example's choices as consecutive rows, in choice order; each row
    is the prompt's ids followed by one choice's ids, right-padded.
    """

    def __init__(self, tokenizer, examples: Sequence[Example], max_length: int) -> None:
        # The very encoding routing.evaluate uses, so prompt lengths match exactly.
        self.encoded = _encode(tokenizer, examples, max_length)

    def mask(self, rows: list[int]) -> torch.Tensor:
        """rows: example index per row -> (rows, width) with 1 on prompt tokens."""
        prompts, widths = [], []
        previous, choice = None, 0
        for example in rows:
            choice = choice + 1 if example == previous else 0
            previous = example
            item = self.encoded[example]
            prompts.append(len(item.prompt))
            widths.append(len(item.prompt) + len(item.choices[choice]))
        mask = torch.zeros(len(rows), max(widths), dtype=torch.long)
        for r, length in enumerate(prompts):
            mask[r, :length] = 1
        return mask
