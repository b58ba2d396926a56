"""Routing diagnostics: which experts real tokens pick, per layer, from a routing trace.

For a held-in task, the share of its tokens whose top-1 expert is the task's own expert shows
whether the router keys tell the tasks apart. It is reported over all tokens and over the
scored positions alone: the last prompt token and the answer tokens but the last, whose
next-token predictions are what rank classification scores and the only positions where the
target loss reaches the gates directly during gate training. A PHATGOOSE gate learns from the
loss, so it tells the tasks apart mostly there; a prompt token's routing reaches the score only
through attention. For a held-out task, the usage of each expert per layer shows where its
tokens go.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from routing.base import BaseModel
from routing.trace import capture_routing
from tasks.task import Example

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class TokenChoices:
    """Experts chosen for the real (non-padding) tokens of a set of sequences."""

    experts: list[str]  # collection expert names; ids index into this list
    by_module: dict[str, torch.Tensor]  # module -> (tokens, k) expert ids, -1: none
    scored: torch.Tensor  # (tokens,) bool: the token's next-token prediction is scored

    def layers(self) -> dict[int, list[str]]:
        """Block index -> the routed modules inside it."""
        grouped: dict[int, list[str]] = {}
        for module in self.by_module:
            match = _LAYER_RE.search(module)
            if match:
                grouped.setdefault(int(match.group(1)), []).append(module)
        return dict(sorted(grouped.items()))

    def own_share(self, own: str) -> dict:
        """Share of token-module pairs whose top-1 expert is `own`: per layer, overall and
        over the scored positions only."""
        index = self.experts.index(own)
        per_layer, hits, total, scored_hits, scored_total = {}, 0, 0, 0, 0
        for layer, modules in self.layers().items():
            top1 = torch.stack([self.by_module[m][:, 0] for m in modules])  # (modules, tokens)
            hit = top1 == index
            layer_hits, scored = int(hit.sum()), hit[:, self.scored]
            per_layer[layer] = layer_hits / max(1, hit.numel())
            hits, total = hits + layer_hits, total + hit.numel()
            scored_hits += int(scored.sum())
            scored_total += scored.numel()
        return {"overall": hits / max(1, total), "scored": scored_hits / max(1, scored_total),
                "per_layer": per_layer}

    def usage(self) -> torch.Tensor:
        """(layers, experts): share of each layer's top-k slots won by each expert."""
        rows = []
        for modules in self.layers().values():
            ids = torch.cat([self.by_module[m].reshape(-1) for m in modules])
            counts = torch.bincount(ids[ids >= 0], minlength=len(self.experts)).float()
            rows.append(counts / counts.sum().clamp(min=1.0))
        return torch.stack(rows) if rows else torch.zeros(0, len(self.experts))


def _sequences(tokenizer, examples: Sequence[Example],
               max_length: int) -> list[tuple[list[int], int]]:
    """Prompt ids then the correct answer's ids, as a contributor's training sees them, each
    with its number of answer ids (the cut, when needed, takes prompt ids from the start)."""
    out = []
    for example in examples:
        prompt = tokenizer(example.input, add_special_tokens=False)["input_ids"]
        target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
        ids = (list(prompt) + list(target))[-max_length:]
        out.append((ids, min(len(target), len(ids) - 1)))
    return out


@torch.inference_mode()
def token_choices(base: BaseModel, examples: Sequence[Example], *, batch_size: int = 16,
                  max_length: int = 128) -> TokenChoices:
    """Run a routed model over prompt + answer and keep the choices at real tokens."""
    pad = base.tokenizer.pad_token_id or 0
    sequences = _sequences(base.tokenizer, examples, max_length)
    kept: dict[str, list[torch.Tensor]] = {}
    scored: list[torch.Tensor] = []
    with capture_routing(base.model) as trace:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(s) for s, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            is_scored = torch.zeros((len(chunk), width), dtype=torch.bool)
            for r, (sequence, answer) in enumerate(chunk):
                ids[r, :len(sequence)] = torch.tensor(sequence)
                mask[r, :len(sequence)] = True
                # Position t predicts token t + 1: the answer's ids are predicted from the
                # last prompt position up to the answer's second-to-last one.
                is_scored[r, len(sequence) - answer - 1:len(sequence) - 1] = True
            scored.append(is_scored[mask])
            trace.records.clear()
            base.model(input_ids=ids, attention_mask=mask.long())
            for module, parts in trace.records.items():
                # One call per forward: rows are the batch's (sequence, position) in order.
                kept.setdefault(module, []).append(parts[-1][mask.reshape(-1)])
    return TokenChoices(trace.experts, {m: torch.cat(v) for m, v in kept.items()},
                        torch.cat(scored))


def own_shares(base: BaseModel, weights, validation: dict[str, Sequence[Example]],
               methods: Sequence[str], *, max_length: int) -> dict[str, dict]:
    """method -> task -> TokenChoices.own_share(task), with each method routing top-2 in turn.

    weights: RouterWeights whose expert names are the tasks of `validation` (task -> its
    examples). The model is left unrouted.
    """
    from routing.router import route, unroute

    shares: dict[str, dict] = {}
    for method in methods:
        route(base, weights, method=method, top_k=2)
        shares[method] = {task: token_choices(base, examples, max_length=max_length)
                          .own_share(task) for task, examples in validation.items()}
    unroute(base.model)
    return shares


def routing_diagnostics(base: BaseModel, weights, plan) -> dict:
    """Own-expert top-1 shares (held-in) and PHATGOOSE expert usage (held-out), validation.

    weights: the exported RouterWeights; plan: the benchmark's config.Plan.
    """
    from bench.zeroshot.config import DIAGNOSED
    from routing.router import route, unroute
    from tasks.registry import split

    validation = {t: split(t, plan.seed).validation[:plan.diagnostic_examples]
                  for t in (*plan.held_in, *plan.held_out)}
    own_share = own_shares(base, weights, {t: validation[t] for t in plan.held_in}, DIAGNOSED,
                           max_length=plan.eval_max_length)
    route(base, weights, method="phatgoose", top_k=2)
    usage = {t: token_choices(base, validation[t], max_length=plan.eval_max_length)
             .usage().tolist() for t in plan.held_out}
    unroute(base.model)
    return {"own_share": own_share, "held_out_usage": usage, "experts": list(weights.experts),
            "examples_per_task": plan.diagnostic_examples, "split": "validation"}
