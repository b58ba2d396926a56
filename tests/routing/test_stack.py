"""Stacking experts into per-module tensors: padding, scalings, Arrow prototypes."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import FingerprintMismatch, InvalidArgument
from routing.stack import arrow_prototype, ia3_prototype, module_pieces, stack_experts
from routing.synthetic import random_bundle
from tests.routing.reference import top_right_singular_vector


@pytest.mark.parametrize("rank,d_in,d_out", [(1, 8, 8), (4, 32, 64), (16, 48, 20)])
def test_arrow_prototype_is_top_right_singular_vector_up_to_sign(rank, d_in, d_out):
    gen = torch.Generator().manual_seed(rank)
    lora_A, lora_B = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank,
                                                                         generator=gen)
    got = arrow_prototype(lora_A, lora_B)
    expected = top_right_singular_vector(lora_B @ lora_A)
    assert abs(float(got @ expected)) == pytest.approx(1.0, abs=1e-5)
    sign = torch.sign(got @ expected)
    torch.testing.assert_close(got, sign * expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["ia3_out", "ia3_in"])
def test_ia3_prototype_is_top_right_singular_vector_of_its_delta(kind):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 10, generator=gen)
    vector = torch.randn(12 if kind == "ia3_out" else 10, generator=gen)
    delta = torch.diag(vector) @ weight if kind == "ia3_out" else weight @ torch.diag(vector)
    got = ia3_prototype(vector, weight, kind)
    assert abs(float(got @ top_right_singular_vector(delta))) == pytest.approx(1.0, abs=1e-5)


def test_stack_pads_ranks_and_keeps_each_scaling(tiny_spec):
    bundles = [random_bundle(tiny_spec, "small", rank=2, alpha=4.0, seed=1),
               random_bundle(tiny_spec, "large", rank=6, alpha=1.0, seed=2),
               random_bundle(tiny_spec, "ia3", method="ia3", seed=3)]
    weights = stack_experts(bundles)
    assert weights.experts == ["small", "large", "ia3"]
    assert weights.fingerprint == tiny_spec.fingerprint
    q = weights.modules["model.layers.1.self_attn.q_proj"]
    assert q.experts == ["small", "large"] and q.rank == 6 and q.ia3_out is None
    assert q.scaling.tolist() == pytest.approx([2.0, 1.0 / 6])
    source = bundles[0].adapter["model.layers.1.self_attn.q_proj.lora_A"]
    assert torch.equal(q.lora_A[0, :2], source) and not q.lora_A[0, 2:].any()
    k = weights.modules["model.layers.1.self_attn.k_proj"]
    assert k.kinds == ["lora", "lora", "ia3_out"]
    expected = bundles[2].adapter["model.layers.1.self_attn.k_proj.ia3"] - 1.0
    assert torch.equal(k.ia3_out[2], expected) and not k.ia3_out[:2].any()
    assert not k.lora_A[2].any()
    down = weights.modules["model.layers.1.mlp.down_proj"]
    assert down.ia3_in is not None and down.ia3_out is None


def test_pieces_stack_module_by_module_like_the_whole(tiny_spec):
    from routing.stack import stack_module

    bundles = [random_bundle(tiny_spec, f"e{i}", seed=i, with_activations=True)
               for i in range(3)]
    whole = stack_experts(bundles)
    name = "model.layers.0.mlp.up_proj"
    d_in, d_out = tiny_spec.linears[name]
    part = stack_module(name, d_in, d_out, [module_pieces(b)[name] for b in bundles])
    for field in ("keys", "prototypes", "activations", "lora_A", "lora_B", "scaling"):
        assert torch.equal(getattr(part, field), getattr(whole.modules[name], field))


def test_stack_refuses_mixed_bases_and_duplicate_names(tiny_spec):
    one = random_bundle(tiny_spec, "a", seed=1)
    other = random_bundle(tiny_spec, "b", seed=2)
    other.manifest.base_fingerprint = "1" * 64
    with pytest.raises(FingerprintMismatch, match="different base models"):
        stack_experts([one, other])
    with pytest.raises(InvalidArgument, match="unique"):
        stack_experts([one, random_bundle(tiny_spec, "a", seed=3)])
    with pytest.raises(InvalidArgument, match="at least one"):
        stack_experts([])


def test_stack_module_names_the_expert_with_a_misfit_piece(tiny_spec):
    from routing.stack import stack_module

    name = "model.layers.0.mlp.up_proj"
    d_in, d_out = tiny_spec.linears[name]
    piece = module_pieces(random_bundle(tiny_spec, "wide", seed=1))[name]
    piece.lora_B = torch.zeros(d_out + 1, piece.lora_A.shape[0])
    with pytest.raises(InvalidArgument, match="expert 'wide' at module .*LoRA factors"):
        stack_module(name, d_in, d_out, [piece])
