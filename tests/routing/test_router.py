"""route() on the tiny Llama: exactness against peft, the baselines, guards, generate()."""

from __future__ import annotations

import copy

import pytest
import torch

from protocol.errors import FailedPrecondition, FingerprintMismatch, InvalidArgument
from routing.base import load_base
from routing.router import route, routing_inputs, unroute
from routing.stack import module_pieces, stack_experts
from routing.synthetic import random_bundle
from routing.trace import capture_routing
from tests.routing.reference import full_delta

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    """A private tiny base (route() edits the model in place; others share tiny_base)."""
    return load_base("tiny-llama")


@pytest.fixture
def tokens():
    return torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _unrouted(base):
    yield
    unroute(base.model)


def logits(model, tokens) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens).logits


def peft_expert(base, method: str, name: str):
    """A peft model on a copy of the base with non-trivial adapter weights, and its bundle."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from contributor.package import bundle_from_peft

    if method == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS, lora_dropout=0.0,
                            init_lora_weights=False)
    else:
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                           feedforward_modules=["down_proj"], init_ia3_weights=False)
    torch.manual_seed(3)
    model = get_peft_model(copy.deepcopy(base.model), config).eval()
    gen = torch.Generator().manual_seed(4)
    for param_name, param in model.named_parameters():
        if "ia3_l" in param_name:  # peft's (IA)^3 starts at exactly 1: make it do something
            param.data = 1.0 + 0.5 * torch.randn(param.shape, generator=gen)
    bundle = bundle_from_peft(model, base, name)
    bundle.gates = {m: torch.randn(g.shape, generator=gen) for m, g in bundle.gates.items()}
    return model, bundle


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_one_expert_top1_equals_peft_model(base, tokens, method):
    peft_model, bundle = peft_expert(base, method, f"{method}-expert")
    expected = logits(peft_model, tokens)
    routed = route(base, [bundle], "phatgoose", top_k=1)
    got = logits(routed, tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected - logits(unroute(base.model), tokens)).abs().max() > 1e-3  # not a no-op


def test_winning_gates_give_that_expert_alone(base, tokens):
    bundles = [random_bundle(base.spec(), f"e{i}", seed=i) for i in range(3)]
    winner = 1
    # Module inputs of the model running expert `winner` alone: if every token picks it, the
    # routed model sees exactly these inputs.
    route(base, bundles, f"single:e{winner}")
    inputs = capture_inputs(base.model, tokens)
    expected = logits(base.model, tokens)
    for module, x in inputs.items():
        normed = torch.nn.functional.layer_norm(x, (x.shape[-1],))
        key = torch.linalg.pinv(normed) @ torch.ones(x.shape[0])  # <LN(x_t), key> = 1 > 0
        for i, bundle in enumerate(bundles):
            bundle.gates[module] = key if i == winner else -key
    routed = route(base, bundles, "phatgoose", top_k=1)
    with capture_routing(routed) as trace:
        got = logits(routed, tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all(bool((trace.choices(m) == winner).all()) for m in inputs)


def capture_inputs(model, tokens) -> dict[str, torch.Tensor]:
    """module name -> (N, d_in) inputs of every routed layer during one forward."""
    from routing.layers import RoutedLinear

    seen, hooks = {}, []

    def keep(name: str):
        def hook(module, args, output) -> None:
            seen[name] = args[0].reshape(-1, args[0].shape[-1]).clone()
        return hook

    for name, module in model.named_modules():
        if isinstance(module, RoutedLinear):
            hooks.append(module.register_forward_hook(keep(name)))
    logits(model, tokens)
    for hook in hooks:
        hook.remove()
    return seen


def test_uniform_merge_is_base_plus_mean_exact_delta(base, tokens):
    spec = base.spec()
    bundles = [random_bundle(spec, "l0", seed=1, rank=2),
               random_bundle(spec, "l1", seed=2, rank=4, alpha=1.0),
               random_bundle(spec, "i0", method="ia3", seed=3)]
    merged = copy.deepcopy(base.model)
    pieces = [module_pieces(b) for b in bundles]
    for name, module in merged.named_modules():
        adapters = [p[name] for p in pieces if name in p]
        if adapters:
            weight = module.weight.data
            module.weight.data = weight + sum(full_delta(a, weight) for a in adapters) \
                / len(adapters)
    got = logits(route(base, bundles, "uniform_merge"), tokens)
    torch.testing.assert_close(got, logits(merged, tokens), atol=1e-5, rtol=0)


def test_mixed_collection_routes_each_module_over_its_own_experts(base, tokens):
    spec = base.spec()
    bundles = [random_bundle(spec, "lora", seed=1), random_bundle(spec, "ia3", method="ia3")]
    routed = route(base, bundles, "phatgoose", top_k=2)
    layers = dict(routed.named_modules())
    assert layers["model.layers.0.self_attn.q_proj"].collection.tolist() == [0]
    assert layers["model.layers.0.self_attn.k_proj"].collection.tolist() == [0, 1]
    with capture_routing(routed) as trace:
        logits(routed, tokens)
    assert set(trace.choices("model.layers.0.self_attn.q_proj").unique().tolist()) == {0}


@pytest.mark.parametrize("method", ["phatgoose", "phatgoose_centred", "arrow",
                                    "average_activation", "smear"])
def test_generate_runs_on_a_routed_model(base, method):
    spec = base.spec()
    bundles = [random_bundle(spec, f"e{i}", seed=i, with_activations=True) for i in range(3)]
    routed = route(base, bundles, method, top_k=2)
    prompt = base.tokenizer(["hello"], return_tensors="pt")
    with torch.inference_mode():
        out = routed.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)


def test_retrieval_routes_each_example_to_its_expert(base, tokens):
    bundles = [random_bundle(base.spec(), f"e{i}", seed=i) for i in range(3)]
    singles = [logits(route(base, bundles, f"single:e{i}"), tokens) for i in (2, 0)]
    routed = route(base, bundles, "retrieval")
    with routing_inputs(routed, expert_index=torch.tensor([2, 0])):
        got = logits(routed, tokens)
    torch.testing.assert_close(got[0], singles[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], singles[1][1], atol=1e-5, rtol=0)
    with pytest.raises(InvalidArgument, match="routing_inputs"):
        logits(routed, tokens)
    with pytest.raises(InvalidArgument, match="one expert per example"), \
            routing_inputs(routed, expert_index=torch.tensor([1])):
        logits(routed, tokens)


def test_smear_with_one_expert_is_that_expert(base, tokens):
    bundle = random_bundle(base.spec(), "only", seed=5)
    expected = logits(route(base, [bundle], "single:only"), tokens)
    torch.testing.assert_close(logits(route(base, [bundle], "smear"), tokens), expected,
                               atol=1e-5, rtol=0)


def test_unroute_restores_the_base_model(base, tokens):
    before = logits(base.model, tokens)
    route(base, [random_bundle(base.spec(), "e", seed=1)])
    unroute(base.model)
    assert torch.equal(logits(base.model, tokens), before)


def test_zero_gate_keys_are_refused(base):
    bundle = random_bundle(base.spec(), "untrained", seed=1)
    module = next(iter(bundle.gates))
    bundle.gates[module] = torch.zeros_like(bundle.gates[module])
    with pytest.raises(FailedPrecondition, match="all zero.*untrained"):
        route(base, [bundle])
    route(base, [bundle], "arrow")  # Arrow does not use the gates


@pytest.mark.parametrize("method", ["average_activation", "phatgoose_centred"])
def test_methods_on_mean_activations_need_them(base, method):
    with pytest.raises(FailedPrecondition, match=f"{method} needs every expert's mean activ"):
        route(base, [random_bundle(base.spec(), "e", seed=1)], method)


def test_fingerprint_mismatch_is_refused(base):
    weights = stack_experts([random_bundle(base.spec(), "e", seed=1)])
    weights.fingerprint = "0" * 64
    with pytest.raises(FingerprintMismatch, match="fingerprint"):
        route(base, weights)
    with pytest.raises(FingerprintMismatch):
        route(base.model, stack_experts([random_bundle(base.spec(), "e")]),
              fingerprint="f" * 64)


def test_unknown_method_and_expert_are_named(base):
    bundles = [random_bundle(base.spec(), "e", seed=1)]
    with pytest.raises(InvalidArgument, match="unknown routing method"):
        route(base, bundles, "moe")
    with pytest.raises(InvalidArgument, match="no expert named 'nope'"):
        route(base, bundles, "single:nope")


def test_a_router_for_another_architecture_leaves_the_model_untouched(base, tokens):
    weights = stack_experts([random_bundle(base.spec(), "e", seed=1)])
    module = weights.modules.pop("model.layers.1.mlp.up_proj")
    module.name = "model.layers.7.mlp.up_proj"
    weights.modules[module.name] = module
    before = logits(base.model, tokens)
    with pytest.raises(InvalidArgument, match="layers.7.mlp.up_proj is not an nn.Linear"):
        route(base, weights)
    assert torch.equal(logits(base.model, tokens), before)
