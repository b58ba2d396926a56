"""A router over experts that adapt different module sets, with different ranks: each module
routes over the experts that adapt it, and a module one expert adapts alone gets its delta."""

from __future__ import annotations

import pytest
import torch

from routing.base import load_base
from routing.router import route, unroute
from routing.stack import module_pieces
from routing.synthetic import random_bundle
from tests.routing.reference import expert_delta

SETS = {"attn": (["q_proj", "v_proj"], 2), "mlp": (["q_proj", "o_proj", "down_proj"], 3),
        "all": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8)}


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-llama")


def _bundles(spec):
    bundles = []
    for seed, (name, (suffixes, rank)) in enumerate(SETS.items(), start=1):
        modules = [m for m in spec.linears if m.rsplit(".", 1)[-1] in suffixes]
        bundles.append(random_bundle(spec, name, rank=rank, seed=seed, modules=modules,
                                     scale=0.3))
    return bundles


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_each_module_routes_over_the_experts_that_adapt_it(base, dispatch):
    bundles = _bundles(base.spec())
    routed = route(base, bundles, "phatgoose", top_k=2, dispatch=dispatch)
    layers = dict(routed.named_modules())
    prefix = "model.layers.1."
    assert layers[prefix + "self_attn.q_proj"].collection.tolist() == [0, 1, 2]
    assert layers[prefix + "self_attn.v_proj"].collection.tolist() == [0, 2]
    assert layers[prefix + "self_attn.o_proj"].collection.tolist() == [1, 2]
    assert layers[prefix + "self_attn.k_proj"].collection.tolist() == [2]

    # k_proj is adapted by "all" alone: its routed output is the base plus that delta
    k_proj = layers[prefix + "self_attn.k_proj"]
    piece = module_pieces(bundles[2])[prefix + "self_attn.k_proj"]
    x = torch.randn(5, k_proj.base.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = k_proj.base(x) + torch.stack(
            [expert_delta(piece, k_proj.base.weight, row) for row in x])
        torch.testing.assert_close(k_proj(x), expected, atol=1e-5, rtol=1e-5)
        tokens = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(routed(tokens).logits).all()
    unroute(base.model)


def test_single_expert_leaves_the_modules_it_does_not_adapt_alone(base):
    from routing.layers import RoutedLinear

    routed = route(base, _bundles(base.spec()), "single:attn")
    replaced = {name.rsplit(".", 1)[-1] for name, module in routed.named_modules()
                if isinstance(module, RoutedLinear)}
    assert replaced == {"q_proj", "v_proj"}
    unroute(base.model)
