"""The routed linear layer: a frozen base `nn.Linear` plus a per-token mixture of expert deltas.

Shapes: x (..., d_in) is flattened to N tokens; E experts adapt the module; r is the padded
LoRA rank; k the number of experts kept per token.

Weights held per layer: A (E, r, d_in) shares the RouterWeights tensor, except under dense
dispatch of a scored method, where A and the (E, d_in) router keys are copied once into one
(E + E*r, d_in) matrix; B is read as (E, r, d_out) row-major, shared too when the stack
stores it that way (stack_module does), else copied once (E*r*d_out floats).

Scoring, always in float32 (a bf16 or fp16 base's input is widened for it, (N, d_in) floats):
LN(x) . key_e for every expert is one (N, d_in) x (d_in, E) GEMM on the raw input
(the keys are centred, so only a per-token scale is missing: (N, 1) floats, computed once per
input for sibling projections); top-k with k passes of max. Extra activations: (N, E).

Two equivalent ways to apply the LoRA part of the top-k mixture, picked per layer:
- dense: h = x A_all^T for all E experts at once (in float32, the same GEMM as the scores),
  weights zero outside the top-k, then one matmul with B_all. Extra activations:
  (N, E + E*r) + (N, E).
  FLOPs ~ N*E*r*(d_in + d_out). Cheapest when E*r is small (a few experts): two plain GEMMs,
  no gather. "auto" picks it up to DENSE_MAX_COLUMNS (float32) or DENSE_MAX_COLUMNS_REDUCED
  (bf16, fp16) columns E*r.
- grouped: the N*k (token, expert) assignments are sorted by expert and two grouped GEMMs
  (`torch.nn.functional.grouped_mm`) run each expert's factors on its own tokens only, the
  dispatch of mixture-of-experts layers. Extra activations: (N*k, d_in) gathered inputs,
  (N*k, r) and (N*k, d_out). FLOPs ~ N*k*r*(d_in + d_out), independent of E; only the
  factors of experts some token picked are read (on CPU the grouped GEMM is a loop of small
  GEMMs, ~2-8 us each, so at hundreds of experts its cost is the factors' memory traffic
  plus 2*E calls).
(IA)^3 deltas are linear in the mixture weights, so they cost one elementwise product
(output-scaled) or one extra matmul with W (input-scaled) whatever the number of experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from protocol.errors import InvalidArgument
from routing.methods import SCORED_METHODS
from routing.paging import AdapterPool, ModulePages
from routing.stack import ModuleRouter

# Dense dispatch up to this many LoRA columns (E*r). Measured on SmolLM2 at 8 x 64 tokens,
# r=8, one thread, best of 4 rounds: 8 experts dense 1.25x the base vs grouped 1.41x; 16
# experts 1.41x both; 32 experts grouped 1.50x vs dense 1.62x.
DENSE_MAX_COLUMNS = 128
# The same in bf16 (weights cast, AMX): the grouped GEMM's CPU path runs each group as a
# skinny GEMM (r output columns), which bf16 kernels handle far worse than float32 ones,
# while one wide dense GEMM is what AMX is fast at. Best of 3 rounds, one thread, routed / base
# (bf16 base 0.38-0.61 s): 8 experts dense 1.53x vs grouped 7.01x; 32: 1.63 vs 4.81;
# 64: 2.27 vs 4.35; 128: 2.60 vs 2.58.
DENSE_MAX_COLUMNS_REDUCED = 1024


class Cancelled(Exception):
    """A routed forward stopped because its RoutingState.cancel said so."""


@dataclass(frozen=True)
class Factors:
    """Expert factors as the mixture reads them, indexed by expert row (local position, or a
    page slot): A (E, r, d_in), B as (E, r, d_out) row-major, (IA)^3 l - 1 (E, d)."""

    lora_A: torch.Tensor | None = None
    lora_B_t: torch.Tensor | None = None
    ia3_out: torch.Tensor | None = None
    ia3_in: torch.Tensor | None = None


@dataclass
class RoutingState:
    """Per-call inputs and switches shared by every routed layer of one model."""

    expert_index: torch.Tensor | None = None  # (batch,) collection index per example
    attention_mask: torch.Tensor | None = None  # (batch, seq), 1 for real tokens (smear)
    # smear: (batch,) rows of the previous call whose merge weights each row reuses, so the
    # choices that continue a shared prompt's cache run the expert merged for that prompt
    merge_rows: torch.Tensor | None = None
    trace: dict[str, list[torch.Tensor]] | None = None  # module -> [(N, k) expert ids]
    config: dict = field(default_factory=dict)  # method, top_k, expert names
    # Polled by every routed layer: when it returns True the forward stops with Cancelled,
    # so a thread running a long routed forward can be stopped between two layers
    cancel: Callable[[], bool] | None = field(default=None, repr=False)
    # (input tensor, its version, (N, 1) inverse std of its tokens): q/k/v and gate/up
    # projections get the very same input tensor, so the score scale is computed once for
    # all of them. Inference tensors carry no version counter: an in-place edit of the input
    # between sibling projections would go unseen (transformers' Llama makes none).
    _inverse_std: tuple | None = field(default=None, repr=False)

    def inverse_std(self, x: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(var + 1e-5) of each token of x (..., d_in), as (N, 1) float32.

        The one scale parameter-free layer norm applies after centring; reused while sibling
        modules see the same tensor. Mean and mean square come from one read of x, with no
        centred copy: rounding grows with |mean| / std, which SmolLM2's projection inputs
        keep under 0.2 (the tests check 2 against the layer-normed reference).
        """
        version = None if x.is_inference() else x._version
        cached = self._inverse_std
        if cached is not None and cached[0] is x and cached[1] == version:
            return cached[2]
        flat = x.reshape(-1, x.shape[-1])
        mean = flat.mean(-1, keepdim=True, dtype=torch.float32)
        mean_square = torch.linalg.vector_norm(
            flat, dim=-1, keepdim=True, dtype=torch.float32).square_() / flat.shape[-1]
        inverse = torch.rsqrt((mean_square - mean.square()).clamp_min_(0.0) + 1e-5)
        self._inverse_std = (x, version, inverse)
        return inverse

    def forget(self) -> None:
        """Drop the cached scale (it keeps the last input tensor alive)."""
        self._inverse_std = None


def parameter_free_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LN(z) = (z - mean z) / sqrt(var z + 1e-5) over the last dim, no affine parameters."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-5)


class RoutedLinear(nn.Module):
    """`y = W x + sum_{e in top-k} w_e delta_e(x)`, or one of the baselines' variants.

    `method` is one of phatgoose, arrow, average_activation (per-token top-k), single (one
    fixed expert), retrieval (one expert per example, from RoutingState.expert_index), smear
    (per-example parameter-averaged expert) or uniform_merge (W + mean exact delta, folded).
    Expert tensors are non-persistent buffers: the state_dict holds only the base weights
    (under "<module>.base."), and `unroute` restores the original module tree. Memory: the
    experts' tensors (shared with the RouterWeights, but for the dense (E + E*r, d_in) copy
    of keys and A) plus, per call, the activations the module docstring lists per dispatch.
    Paged (the router's module holds keys only and `pool` the factors, routing.paging): the
    keys plus this module's slots in the pool; a call whose tokens pick more experts than
    there are slots runs in chunks of experts.
    """

    def __init__(self, base: nn.Linear, router: ModuleRouter, *, method: str, top_k: int,
                 state: RoutingState, collection_index: list[int], single: int = -1,
                 dispatch: str = "auto", pool: AdapterPool | None = None) -> None:
        super().__init__()
        self.base = base
        self.name = router.name
        self.method = method
        self.top_k = min(top_k, len(router.experts))
        self.state = state
        self.single = single  # local position of the fixed expert for method "single"
        self._merge_weights: torch.Tensor | None = None  # smear: the last call's, per row
        count = len(router.experts)
        self.rank = router.rank
        self.pages: ModulePages | None = None
        if router.paged and pool is None:
            raise InvalidArgument(f"module {router.name} holds keys only: route it with the "
                                  "RouterWeights' adapter pool", field="adapters")
        # grouped_mm wants 16-byte aligned strides: feature sizes that are multiples of 4
        groupable = base.in_features % 4 == 0 and base.out_features % 4 == 0
        reduced = base.weight.dtype in (torch.bfloat16, torch.float16)
        dense_max = DENSE_MAX_COLUMNS_REDUCED if reduced else DENSE_MAX_COLUMNS
        rows = min(count, pool.slots) if router.paged else count  # expert rows a call reads
        self.dense = dispatch == "dense" or not groupable or (
            dispatch == "auto" and rows * self.rank <= dense_max)
        self._buffer("collection", torch.tensor(collection_index, dtype=torch.long))
        self._buffer("scaling", router.scaling)
        if router.paged:
            rank = self.rank if self.dense else -(-self.rank // 4) * 4
            self.pages = pool.module(router, collection_index, rank=rank,
                                     device=base.weight.device, dtype=base.weight.dtype)
        lora_A, lora_B = router.lora_A, router.lora_B
        if lora_A is not None and not self.dense and self.rank % 4:
            pad = 4 - self.rank % 4  # zero rank columns add nothing; copies only odd ranks
            lora_A = F.pad(lora_A, (0, 0, 0, pad))
            lora_B = F.pad(lora_B, (0, pad))
        self._buffer("lora_A", lora_A)  # (E, r, d_in), shared with the RouterWeights
        if lora_B is not None:
            # (E, r, d_out) row-major per expert, which both dispatches read fastest (the
            # grouped GEMM is ~2x slower on a transposed view at hundreds of experts); a copy
            # unless the stack already holds B that way (routing.stack does)
            lora_B = lora_B.transpose(1, 2).contiguous()
        self._buffer("lora_B_t", lora_B)
        self._buffer("ia3_out", router.ia3_out)  # (E, d_out)
        self._buffer("ia3_in", router.ia3_in)  # (E, d_in)
        keys = _route_keys(router, method)
        # Scores are taken in float32 whatever the base's dtype: a bf16 score keeps 3
        # significant digits, enough to reorder close experts.
        self._buffer("route_keys", keys, score=True)  # (E, d_in)
        # phatgoose_centred: <x - mean input, key_e> = <x, key_e> - bias_e (E,)
        self._buffer("route_bias", _centring_bias(router, keys)
                     if method == "phatgoose_centred" else None, score=True)
        fused = None
        if self.dense and self.lora_A is not None and method in SCORED_METHODS and not reduced:
            # one (E + E*r, d_in) matrix so that one GEMM gives the scores and x A_e^T of
            # every expert: a GEMM only E columns wide runs at a third of the speed.
            # route_keys and lora_A become views of it (a device move copies each apart).
            fused = torch.cat([self.route_keys, self.lora_A.reshape(-1, base.in_features)])
            self.route_keys = fused[:count]
            self.lora_A = fused[count:].view(count, self.rank, base.in_features)
        self._buffer("keys_and_lora_A", fused)
        if method == "retrieval":
            local = torch.full((max(collection_index) + 1,), -1, dtype=torch.long)
            local[torch.tensor(collection_index)] = torch.arange(count)
            self._buffer("local_of", local)  # collection index -> local position or -1
        if method == "uniform_merge":
            self._buffer("merged_weight", self._merged_weight())

    def _buffer(self, name: str, tensor: torch.Tensor | None, score: bool = False) -> None:
        """Register `tensor` on the base layer's device, in its float dtype (score tensors:
        float32)."""
        if tensor is not None:
            weight = self.base.weight
            dtype = weight.dtype if tensor.is_floating_point() else tensor.dtype
            dtype = torch.float32 if score else dtype
            tensor = tensor.to(device=weight.device, dtype=dtype)
        self.register_buffer(name, tensor, persistent=False)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) -> (..., d_out)."""
        if self.state.cancel is not None and self.state.cancel():
            raise Cancelled(f"routed forward stopped at {self.name}")
        if self.method == "uniform_merge":
            return F.linear(x, self.merged_weight, self.base.bias)
        out = self.base(x)
        if self.method == "smear":
            return out + self._smear_delta(x, out)
        flat = x.reshape(-1, x.shape[-1])
        scores = hidden = None
        if self.keys_and_lora_A is not None:
            both = flat @ self.keys_and_lora_A.T  # (N, E + E*r)
            experts = self.route_keys.shape[0]
            scores, hidden = both[:, :experts], both[:, experts:]
        index, weight = self._select(x, flat, scores)
        if self.state.trace is not None:
            kept = torch.where(weight > 0, self.collection[index], -1)
            self.state.trace.setdefault(self.name, []).append(kept.cpu())
        if self.pages is not None:
            self._add_paged(out.view(-1, out.shape[-1]), flat, index, weight)
        else:
            self.add_mixture(out.view(-1, out.shape[-1]), flat, index, weight, hidden)
        return out

    def _select(self, x: torch.Tensor, flat: torch.Tensor,
                scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token of x (..., d_in), flattened as flat (N, d_in): (N, k) local expert
        positions and their mixture weights. scores: flat @ route_keys.T (N, E) if the
        caller has it already (it is overwritten)."""
        count = flat.shape[0]
        if self.method == "single":
            index = torch.full((count, 1), self.single, dtype=torch.long, device=flat.device)
            return index, torch.ones(count, 1, dtype=flat.dtype, device=flat.device)
        if self.method == "retrieval":
            return self._retrieval_select(x.shape)
        if scores is None:
            scores = flat.to(self.route_keys.dtype) @ self.route_keys.T  # (N, E) float32
        if self.route_bias is not None:
            scores -= self.route_bias
        if self.method == "arrow":  # |x . proto|: a prototype's sign is arbitrary
            top, index = top_k(scores.abs_(), self.top_k)
        else:
            # LN(x) . key = (x . key) * inverse_std(x), because every key has zero mean: the
            # top-k of the raw products is the top-k of the scores, and only the k kept ones
            # need scaling (no normalised copy of x, no (N, E) rescale)
            top, index = top_k(scores, self.top_k)
            top = top * self.state.inverse_std(x)
        # softmax over the kept scores == renormalised top-k of the full softmax
        return index, torch.softmax(top.float(), dim=-1).to(flat.dtype)

    def _retrieval_select(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = self.state.expert_index
        seq = math.prod(shape[1:-1]) if len(shape) > 2 else 1
        if chosen is None or chosen.numel() * seq != math.prod(shape[:-1]):
            got = None if chosen is None else tuple(chosen.shape)
            raise InvalidArgument(
                f"method 'retrieval' needs one expert per example: wrap the call in "
                f"routing_inputs(model, expert_index=tensor of shape ({shape[0]},)); got {got}",
                field="expert_index")
        chosen = chosen.to(self.local_of.device).long().reshape(-1)
        local = torch.full_like(chosen, -1)
        known = chosen < self.local_of.shape[0]
        local[known] = self.local_of[chosen[known]]
        local = local.repeat_interleave(seq).unsqueeze(1)  # (N, 1)
        weight = (local >= 0).to(self.base.weight.dtype)  # experts not adapting here add nothing
        return local.clamp(min=0), weight

    def add_mixture(self, out: torch.Tensor, flat: torch.Tensor, index: torch.Tensor,
                    weight: torch.Tensor, lora_hidden: torch.Tensor | None = None) -> None:
        """out += sum_j weight[t, j] * delta_{index[t, j]}(x_t), in place.

        out (N, d_out) holds the base output W x_t on entry (output-scaled (IA)^3 scales it);
        flat (N, d_in); index, weight (N, k) local expert positions and mixture weights;
        lora_hidden: flat A_e^T of every expert (N, E*r) when the dense caller has it
        (it is overwritten).
        """
        lora_weight = weight * self.scaling[index] if self.lora_A is not None else None
        self._mix(out, out, flat, index, weight, lora_weight, self._factors(), lora_hidden)

    def _add_paged(self, out: torch.Tensor, flat: torch.Tensor, index: torch.Tensor,
                   weight: torch.Tensor) -> None:
        """add_mixture with the factors in page slots: the experts the tokens picked are made
        resident, then mixed with each pick mapped from its expert's position to its slot.
        When they are more than the module's slots, they go in chunks of experts, each
        chunk computing only the picks of its own experts (so no pick is computed twice)."""
        pages = self.pages
        needed = torch.unique(index)  # sorted local positions
        lora_weight = weight * self.scaling[index] if pages.has("lora_A") else None
        if needed.numel() <= pages.capacity:
            slot_of = pages.load(needed.cpu())
            self._mix(out, out, flat, slot_of[index], weight, lora_weight, self._slabs())
            return
        base_out = out.clone()  # output-scaled (IA)^3 scales the base output alone
        owner = torch.full((len(pages.kinds),), -1, dtype=torch.long, device=index.device)
        picks = index.reshape(-1)
        for number, (positions, slot_of) in enumerate(pages.chunks(needed)):
            owner[positions.to(index.device)] = number
            chosen = (owner[picks] == number).nonzero().squeeze(1)  # this chunk's picks
            tokens = chosen // index.shape[1]
            part = torch.zeros(chosen.numel(), out.shape[1], dtype=out.dtype, device=out.device)
            self._mix(part, base_out.index_select(0, tokens), flat.index_select(0, tokens),
                      slot_of[picks[chosen]].unsqueeze(1), weight.reshape(-1, 1)[chosen],
                      None if lora_weight is None else lora_weight.reshape(-1, 1)[chosen],
                      self._slabs())
            out.index_add_(0, tokens, part)

    def _slabs(self) -> Factors:
        pages = self.pages
        return Factors(pages.tensor("lora_A"), pages.tensor("lora_B_t"),
                       pages.tensor("ia3_out"), pages.tensor("ia3_in"))

    def _factors(self) -> Factors:
        return Factors(self.lora_A, self.lora_B_t, self.ia3_out, self.ia3_in)

    def _mix(self, out: torch.Tensor, base_out: torch.Tensor, flat: torch.Tensor,
             index: torch.Tensor, weight: torch.Tensor, lora_weight: torch.Tensor | None,
             factors: Factors, lora_hidden: torch.Tensor | None = None) -> None:
        """out += the mixture of `factors` rows `index` (N, k) with `weight` (N, k) ((IA)^3)
        and `lora_weight` (N, k) (LoRA, the expert's scaling included); base_out: the base
        output that output-scaled (IA)^3 scales (it may be `out` itself, read first)."""
        scaled_base = None
        if factors.ia3_out is not None:  # computed first: it reads the untouched base output
            # peft scales the whole base output (bias included; Llama has none)
            scaled_base = torch.einsum("nk,nkd->nd", weight, factors.ia3_out[index]) * base_out
        if factors.lora_A is not None:
            if self.dense:
                _add_lora_dense(out, flat, index, lora_weight, factors, lora_hidden)
            else:
                _add_lora_grouped(out, flat, index, lora_weight, factors)
        if factors.ia3_in is not None:
            coeff = torch.einsum("nk,nkd->nd", weight, factors.ia3_in[index])
            out += F.linear(coeff * flat, self.base.weight)
        if scaled_base is not None:
            out += scaled_base

    def _factor_chunks(self) -> list[tuple[torch.Tensor, Factors]]:
        """Every expert's factors, as (local positions, their factors) chunks: one chunk of
        the held tensors, or the page slots' chunk by chunk (for the methods that read every
        expert: smear and uniform_merge)."""
        if self.pages is None:
            return [(torch.arange(len(self.collection), device=self.collection.device),
                     self._factors())]
        out = []
        everyone = torch.arange(len(self.collection))
        for positions, slot_of in self.pages.chunks(everyone):
            slots = slot_of[positions.to(slot_of.device)]
            pick = {name: self.pages.tensor(name) for name in
                    ("lora_A", "lora_B_t", "ia3_out", "ia3_in")}
            out.append((positions.to(self.collection.device), Factors(**{
                name: None if slab is None else slab[slots] for name, slab in pick.items()})))
        return out

    # ---- per-example baselines ---------------------------------------------------------------
    def _smear_delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """SMEAR-style: per example, average the experts' parameters, then run that one expert.

        The router is softmax_e(<LN(mean_t x_t), LN(key_e)> / sqrt(d_in)) over the gate keys:
        our data-free stand-in for SMEAR's trained router. x: (batch, seq, d_in).
        """
        seq_x = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        reuse = self.state.merge_rows
        if reuse is not None:
            if self._merge_weights is None or reuse.shape[0] != seq_x.shape[0]:
                raise InvalidArgument(
                    "smear's merge_rows names rows of a previous call: run the prompts first, "
                    "then pass one row index per row of this call", field="merge_rows")
            probs = self._merge_weights.index_select(0, reuse.to(seq_x.device))
        else:
            mask = self.state.attention_mask
            if mask is not None and tuple(mask.shape) == tuple(seq_x.shape[:2]):
                mask = mask.to(seq_x.dtype).unsqueeze(-1)
                mean = (seq_x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            else:
                mean = seq_x.mean(1)
            scores = parameter_free_layer_norm(mean.float()) @ self.route_keys.T
            probs = torch.softmax(scores, dim=-1).to(seq_x.dtype)
            self._merge_weights = probs  # (batch, E), for calls that continue these rows
        if self.state.trace is not None:
            top = self.collection[probs.argmax(-1)].repeat_interleave(seq_x.shape[1])
            self.state.trace.setdefault(self.name, []).append(top.unsqueeze(1).cpu())
        delta = torch.zeros_like(base_out).reshape(seq_x.shape[0], seq_x.shape[1], -1)
        merged: dict[str, torch.Tensor] = {}
        for positions, factors in self._factor_chunks():  # the merge is a sum over experts
            share = probs[:, positions]  # (batch, E_chunk)
            parts = {}
            if factors.lora_A is not None:
                parts["A"] = torch.einsum("be,erd->brd", share, factors.lora_A)
                parts["B"] = torch.einsum("be,ero->bor", share * self.scaling[positions],
                                          factors.lora_B_t)
            if factors.ia3_out is not None:
                parts["out"] = share @ factors.ia3_out
            if factors.ia3_in is not None:
                parts["in"] = share @ factors.ia3_in
            for key, value in parts.items():
                merged[key] = merged[key] + value if key in merged else value
        if "A" in merged:
            delta += torch.bmm(torch.bmm(seq_x, merged["A"].transpose(1, 2)),
                               merged["B"].transpose(1, 2))
        if "out" in merged:
            delta += merged["out"].unsqueeze(1) * base_out.reshape_as(delta)
        if "in" in merged:
            delta += F.linear(merged["in"].unsqueeze(1) * seq_x, self.base.weight)
        return delta.reshape_as(base_out)

    def _merged_weight(self) -> torch.Tensor:
        """W + (1/E) sum_e dW_e with exact deltas (B A products, diag(l-1) W, W diag(l-1))."""
        weight = self.base.weight.detach()
        count = len(self.collection)
        total = torch.zeros_like(weight)
        for positions, factors in self._factor_chunks():
            if factors.lora_A is not None:
                scaled_B = factors.lora_B_t * self.scaling[positions].view(-1, 1, 1)
                total += scaled_B.reshape(-1, weight.shape[0]).T @ \
                    factors.lora_A.reshape(-1, weight.shape[1])  # (E_chunk, r, d_out)
            if factors.ia3_out is not None:
                total += factors.ia3_out.sum(0).unsqueeze(1) * weight
            if factors.ia3_in is not None:
                total += weight * factors.ia3_in.sum(0).unsqueeze(0)
        return weight + total / count

    def extra_repr(self) -> str:
        paged = "" if self.pages is None else f", paged slots={self.pages.capacity}"
        return (f"{self.name}, method={self.method}, experts={len(self.collection)}, "
                f"top_k={self.top_k}, rank={self.rank}, dense={self.dense}{paged}")


def _add_lora_dense(out: torch.Tensor, flat: torch.Tensor, index: torch.Tensor,
                    weight: torch.Tensor, factors: Factors,
                    hidden: torch.Tensor | None) -> None:
    """Every row's x A^T in one GEMM, weights zero outside the picks, one GEMM with B."""
    count, experts = flat.shape[0], factors.lora_A.shape[0]
    if hidden is None:
        hidden = flat @ factors.lora_A.reshape(-1, flat.shape[1]).T  # (N, E*r)
    full = torch.zeros(count, experts, dtype=flat.dtype, device=flat.device)
    # add, not set: a chunked paged call maps the picks of other chunks to row 0 at weight 0
    full.scatter_add_(1, index, weight.to(flat.dtype))  # (N, E), zero outside the top-k
    hidden.view(count, experts, -1).mul_(full.unsqueeze(-1))
    # row e*r + j of lora_B_t.view(E*r, d_out) is column j of B_e, as in lora_A's view
    out.addmm_(hidden, factors.lora_B_t.reshape(-1, out.shape[1]))


def _add_lora_grouped(out: torch.Tensor, flat: torch.Tensor, index: torch.Tensor,
                      weight: torch.Tensor, factors: Factors) -> None:
    """Assignments sorted by expert row, two grouped GEMMs over the rows' own tokens."""
    kept = index.shape[1]
    experts = index.reshape(-1)
    order = torch.argsort(experts, stable=True)  # assignments grouped by expert
    counts = torch.bincount(experts, minlength=factors.lora_A.shape[0])
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    tokens = order // kept
    gathered = flat.index_select(0, tokens)  # (N*k, d_in)
    hidden = F.grouped_mm(gathered, factors.lora_A.transpose(1, 2), offs=offsets)  # (N*k, r)
    hidden *= weight.reshape(-1)[order].unsqueeze(1).to(hidden.dtype)
    delta = F.grouped_mm(hidden, factors.lora_B_t, offs=offsets)  # (N*k, d_out)
    out.index_add_(0, tokens, delta)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of scores (N, E), descending: (values, indices), both (N, k).

    Overwrites scores. Ties go to the lower expert index, as in the reference loop (torch.topk
    leaves them unspecified). For the usual few picks, k passes of max also cost less on CPU
    than torch.topk's per-row selection (512 tokens, 64 experts, k=2: 0.12 vs 0.30 ms).
    """
    if k > 4:
        values, indices = scores.sort(dim=-1, descending=True, stable=True)
        return values[:, :k], indices[:, :k]
    values, indices = [], []
    for pick in range(k):
        value, index = scores.max(dim=-1, keepdim=True)  # the first maximum of each row
        values.append(value)
        indices.append(index)
        if pick + 1 < k:
            scores.scatter_(-1, index, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


def _centring_bias(router: ModuleRouter, keys: torch.Tensor) -> torch.Tensor:
    """bias_e = <mu, key_e> (E,), mu = the experts' mean activations averaged over experts;
    keys: the layer-normed gate keys of _route_keys.

    A deviation (docs/methods.md), opt-in as method "phatgoose_centred": PHATGOOSE scores
    <LN(x), LN(v_e)>; this scores <x - mu, LN(v_e)> / sqrt(d_in), scaled by x's inverse std
    as LN(x) is. A gate trained only on its own data learns mostly whether to open there,
    along the direction every token shares (mu), so <mu, key_e> becomes a per-expert bias
    that sends every task's tokens to the expert with the largest gain on its own data
    (measured in docs/gates.md). mu comes from the bundles' shipped mean activations
    (the Average Activation baseline's); no data reaches the router.
    """
    if router.activations is None:
        raise InvalidArgument(f"method phatgoose_centred needs every expert's mean activations; "
                              f"module {router.name} lacks them", field="method")
    return (keys.double() @ router.activations.double().mean(dim=0)).float()


def _route_keys(router: ModuleRouter, method: str) -> torch.Tensor:
    """The (E, d_in) matrix scores are taken against, normalised once at build time.

    Gate and activation keys are layer-normed (in float64, so each row's mean is zero to
    float32 precision): RoutedLinear relies on that to score raw inputs.
    """
    if method == "arrow":
        return router.prototypes
    source = router.activations if method == "average_activation" else router.keys
    if source is None:
        return router.keys  # unused by this method; keeps the buffer's shape uniform
    return (parameter_free_layer_norm(source.double()) / math.sqrt(router.d_in)).float()
