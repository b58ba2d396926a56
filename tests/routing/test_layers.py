"""The vectorised routed layer against the slow reference loop, for 2, 8 and 64 experts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routing.layers import RoutedLinear, RoutingState, parameter_free_layer_norm, top_k
from routing.stack import ExpertPiece, stack_module, with_ia3_prototypes
from tests.routing.reference import reference_routed_delta

D_IN, D_OUT = 24, 40


def random_pieces(count: int, kinds: tuple[str, ...], seed: int) -> list[ExpertPiece]:
    """`count` experts cycling over `kinds`, LoRA ranks 2..4 (so padding is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    pieces = []
    for e in range(count):
        kind = kinds[e % len(kinds)]
        piece = ExpertPiece(expert=f"e{e}", kind=kind, gate=torch.randn(D_IN, generator=gen),
                            activation=torch.randn(D_IN, generator=gen))
        if kind == "lora":
            rank = 2 + e % 3
            piece.lora_A = torch.randn(rank, D_IN, generator=gen) * 0.3
            piece.lora_B = torch.randn(D_OUT, rank, generator=gen) * 0.3
            piece.scaling = 0.5 + e % 4  # mismatched scalings must each be honoured
        else:
            size = D_OUT if kind == "ia3_out" else D_IN
            piece.ia3 = 1.0 + 0.3 * torch.randn(size, generator=gen)
        pieces.append(piece)
    return pieces


def build_layer(pieces: list[ExpertPiece], method: str, top_k: int, dispatch: str,
                state: RoutingState | None = None, dtype: torch.dtype = torch.float32,
                **options) -> RoutedLinear:
    torch.manual_seed(1)
    base = nn.Linear(D_IN, D_OUT, bias=False).to(dtype)
    router = with_ia3_prototypes(stack_module("m", D_IN, D_OUT, pieces), base.weight)
    return RoutedLinear(base, router, method=method, top_k=top_k,
                        state=state or RoutingState(),
                        collection_index=list(range(len(pieces))), dispatch=dispatch,
                        **options)


@pytest.mark.parametrize("count", [2, 8, 64])
@pytest.mark.parametrize("method", ["phatgoose", "phatgoose_centred", "arrow",
                                    "average_activation"])
@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_fast_layer_matches_reference_loop(count, method, dispatch):
    pieces = random_pieces(count, ("lora", "ia3_out", "lora", "ia3_in"), seed=count)
    layer = build_layer(pieces, method, top_k=2, dispatch=dispatch)
    x = torch.randn(2, 6, D_IN, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        got = layer(x) - layer.base(x)
    expected = reference_routed_delta(pieces, layer.base.weight.detach(), x.reshape(-1, D_IN),
                                      method, top_k=2)
    torch.testing.assert_close(got.reshape(-1, D_OUT), expected, atol=1e-5, rtol=1e-5)


def test_auto_dispatch_stays_dense_longer_in_bf16():
    # 64 experts of rank <= 4: 256 LoRA columns, past float32's dense limit (128) but within
    # bf16's (1024), where the grouped GEMM's skinny per-expert products are slow on CPU
    pieces = random_pieces(64, ("lora",), seed=5)
    assert not build_layer(pieces, "phatgoose", top_k=2, dispatch="auto").dense
    reduced = build_layer(pieces, "phatgoose", top_k=2, dispatch="auto", dtype=torch.bfloat16)
    assert reduced.dense and reduced.lora_A.dtype == torch.bfloat16
    x = torch.randn(2, 6, D_IN, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        got = (reduced(x.bfloat16()) - reduced.base(x.bfloat16())).float()
    expected = reference_routed_delta(pieces, reduced.base.weight.detach().float(),
                                      x.reshape(-1, D_IN), "phatgoose", top_k=2)
    # bf16 rounding of inputs, factors and keys: a loose tolerance, and near-tied scores may
    # pick another expert, so most (not all) tokens must match
    close = torch.isclose(got.reshape(-1, D_OUT), expected, atol=0.15, rtol=0.05).all(dim=1)
    assert close.float().mean() >= 0.75


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_inputs_far_from_zero_mean_route_like_the_reference(dispatch):
    # scores are raw products scaled by a one-pass inverse std, with no centred copy of x:
    # a mean twice the spread (SmolLM2's projection inputs reach 0.2) must still pick and
    # weigh experts as the layer-normed reference does
    pieces = random_pieces(64, ("lora",), seed=11)
    layer = build_layer(pieces, "phatgoose", top_k=2, dispatch=dispatch)
    gen = torch.Generator().manual_seed(12)
    x = 0.5 * torch.randn(3, 7, D_IN, generator=gen) + 1.0
    with torch.inference_mode():
        got = layer(x) - layer.base(x)
    expected = reference_routed_delta(pieces, layer.base.weight.detach(), x.reshape(-1, D_IN),
                                      "phatgoose", top_k=2)
    torch.testing.assert_close(got.reshape(-1, D_OUT), expected, atol=1e-5, rtol=1e-5)


def test_centring_removes_the_bias_that_the_shared_input_direction_gives():
    # every token carries the experts' mean input mu; expert 0's gate points along mu, so
    # plain PHATGOOSE sends every token to it, while centred scoring follows the rest of x
    gen = torch.Generator().manual_seed(3)
    pieces = random_pieces(4, ("lora",), seed=5)
    mu = 4.0 * torch.randn(D_IN, generator=gen)
    for piece in pieces:
        piece.activation = mu.clone()
    pieces[0].gate = mu + 0.1 * torch.randn(D_IN, generator=gen)
    x = mu + torch.randn(64, D_IN, generator=gen)
    chosen = {}
    for method in ("phatgoose", "phatgoose_centred"):
        state = RoutingState(trace={})
        layer = build_layer(pieces, method, top_k=1, dispatch="dense", state=state)
        with torch.inference_mode():
            layer(x)
        chosen[method] = torch.bincount(state.trace["m"][0][:, 0], minlength=4)
    assert chosen["phatgoose"][0] == 64
    assert chosen["phatgoose_centred"][0] < 32 and (chosen["phatgoose_centred"][1:] > 0).all()


def test_inverse_std_is_the_layer_norm_scale_and_is_shared_until_the_input_changes():
    state = RoutingState()
    x = 3.0 + torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(13))
    flat = x.reshape(-1, D_IN)
    scale = state.inverse_std(x)  # (N, 1)
    centred = flat - flat.mean(-1, keepdim=True)
    torch.testing.assert_close(centred * scale, parameter_free_layer_norm(flat))
    assert state.inverse_std(x) is scale  # a sibling projection reuses it
    x.mul_(2.0)  # an in-place edit bumps the version: recomputed, halved
    torch.testing.assert_close(state.inverse_std(x), scale / 2, rtol=1e-4, atol=0)


@pytest.mark.parametrize("experts", [4, 16, 64, 300])
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_top_k_keeps_the_lower_expert_on_ties(experts, k):
    # rounded scores tie often; the reference loop keeps the lower index among equals
    scores = torch.randn(40, experts, generator=torch.Generator().manual_seed(experts)).round()
    values, index = top_k(scores.clone(), k)
    order = sorted(range(experts), key=lambda e: -scores[0, e])  # stable, like the reference
    assert index[0].tolist() == order[:k]
    expected = scores.sort(dim=-1, descending=True, stable=True)
    torch.testing.assert_close(values, expected.values[:, :k])
    assert torch.equal(index, expected.indices[:, :k])


@pytest.mark.parametrize("kinds", [("lora",), ("ia3_out",), ("ia3_in",), ("lora", "ia3_in")])
def test_layer_mixes_each_kind_with_its_own_delta(kinds):
    pieces = random_pieces(5, kinds, seed=3)
    layer = build_layer(pieces, "phatgoose", top_k=3, dispatch="grouped")
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got = layer(x) - layer.base(x)
    expected = reference_routed_delta(pieces, layer.base.weight.detach(), x, "phatgoose", 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dense_and_grouped_dispatch_agree_with_many_tokens():
    pieces = random_pieces(16, ("lora",), seed=5)
    x = torch.randn(4, 50, D_IN, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        dense = build_layer(pieces, "phatgoose", 2, "dense")(x)
        grouped = build_layer(pieces, "phatgoose", 2, "grouped")(x)
    torch.testing.assert_close(dense, grouped, atol=1e-5, rtol=1e-5)


def test_top_k_larger_than_the_module_experts_uses_them_all():
    pieces = random_pieces(2, ("lora",), seed=8)
    layer = build_layer(pieces, "phatgoose", top_k=5, dispatch="grouped")
    x = torch.randn(3, D_IN)
    with torch.inference_mode():
        got = layer(x) - layer.base(x)
    expected = reference_routed_delta(pieces, layer.base.weight.detach(), x, "phatgoose", 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_smear_runs_the_parameter_averaged_expert():
    pieces = random_pieces(3, ("lora", "ia3_out"), seed=9)
    for piece in pieces:
        piece.gate = pieces[0].gate.clone()  # equal keys: the router gives each 1/3
    layer = build_layer(pieces, "smear", top_k=2, dispatch="dense")
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(2))
    weight = layer.base.weight.detach()
    lora = [p for p in pieces if p.kind == "lora"]
    rank = max(p.lora_A.shape[0] for p in lora)
    merged_A = sum(nn.functional.pad(p.lora_A, (0, 0, 0, rank - p.lora_A.shape[0]))
                   for p in lora) / 3
    merged_B = sum(p.scaling * nn.functional.pad(p.lora_B, (0, rank - p.lora_B.shape[1]))
                   for p in lora) / 3
    merged_l = sum(p.ia3 - 1.0 for p in pieces if p.kind == "ia3_out") / 3
    expected = x @ merged_A.T @ merged_B.T + merged_l * (x @ weight.T)
    with torch.inference_mode():
        got = layer(x) - layer.base(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_smear_merge_rows_reuse_each_prompts_merged_expert():
    """Choices continuing a prompt run the expert merged from that prompt, not from themselves."""
    from protocol.errors import InvalidArgument

    layer = build_layer(random_pieces(3, ("lora", "lora"), seed=4), "smear", top_k=2,
                        dispatch="dense")
    generator = torch.Generator().manual_seed(5)
    prompts = torch.randn(2, 6, D_IN, generator=generator)  # two prompts of 6 tokens
    choices = torch.randn(3, 2, D_IN, generator=generator)  # three choices of 2 tokens
    with torch.inference_mode():
        layer.state.merge_rows = torch.tensor([0])
        with pytest.raises(InvalidArgument, match="run the prompts first"):
            layer(choices[:1])  # nothing merged yet
        layer.state.merge_rows = None
        layer(prompts)
        layer.state.merge_rows = torch.tensor([1, 1, 0])  # rows 0, 1 continue prompt 1
        got = layer(choices)
        layer.state.merge_rows = None
        for row, prompt in enumerate((1, 1, 0)):
            # the same prompt's tokens followed by the choice's, merged over the prompt only
            layer.state.attention_mask = torch.tensor([[1] * 6 + [0] * 2])
            whole = layer(torch.cat([prompts[prompt:prompt + 1], choices[row:row + 1]], 1))
            torch.testing.assert_close(got[row], whole[0, 6:], atol=1e-5, rtol=1e-5)
        layer.state.attention_mask = None
