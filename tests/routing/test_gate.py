"""The PHATGOOSE gated expert layer: exact deltas, zero init, frozen base and expert."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contributor.data import Example, one_pass, tokenize
from contributor.package import expert_from_peft
from protocol.bundle import ModuleSpec
from routing.gate import GatedExpertLinear, gate_vectors, gated_experts, mean_input_activations


def _peft_expert(base, method: str, seed: int = 0):
    """A peft model on `base.model` with random (non-identity) adapter weights."""
    from peft import IA3Config, LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=2, target_modules="all-linear") if method == "lora" \
        else IA3Config()
    model = get_peft_model(base.model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture
def tiny_base():
    """A private tiny base: these tests wrap it with peft, so keep the shared one untouched."""
    from routing.base import load_base

    return load_base("tiny-llama")


@pytest.fixture
def batch(tiny_base):
    examples = tokenize([Example("the quick brown fox", " jumps"), Example("hi", " there")],
                        tiny_base.tokenizer, max_length=32)
    return next(one_pass(examples, 2, tiny_base.tokenizer.pad_token_id))


def test_lora_delta_is_scaled_product_and_gate_starts_at_half():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=False)
    tensors = {"lora_A": torch.randn(3, 6), "lora_B": torch.randn(5, 3)}
    layer = GatedExpertLinear(base, ModuleSpec("m", "lora", 6, 5), tensors, scaling=0.25)
    x = torch.randn(2, 4, 6)
    assert torch.equal(layer.gate, torch.zeros(6))
    expected = base(x) + 0.5 * 0.25 * x @ (tensors["lora_B"] @ tensors["lora_A"]).T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ["ia3_out", "ia3_in"])
def test_ia3_deltas_scale_output_or_input(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=False)
    size = 5 if kind == "ia3_out" else 6
    vector = 1.0 + torch.randn(size)
    layer = GatedExpertLinear(base, ModuleSpec("m", kind, 6, 5), {"ia3": vector}, scaling=1.0)
    layer.gate_enabled = False
    x = torch.randn(2, 3, 6)
    expected = vector * base(x) if kind == "ia3_out" else base(vector * x)
    torch.testing.assert_close(layer(x), expected)


def test_gate_is_per_token():
    torch.manual_seed(0)
    base = nn.Linear(4, 4, bias=False)
    tensors = {"lora_A": torch.randn(2, 4), "lora_B": torch.randn(4, 2)}
    layer = GatedExpertLinear(base, ModuleSpec("m", "lora", 4, 4), tensors, scaling=1.0)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([5.0, -5.0, 0.0, 0.0]))
    x = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])  # gate ~1 then ~0
    delta = x @ (tensors["lora_B"] @ tensors["lora_A"]).T
    out = layer(x) - base(x)
    torch.testing.assert_close(out[0, 0], torch.sigmoid(torch.tensor(5.0)) * delta[0, 0])
    torch.testing.assert_close(out[0, 1], torch.sigmoid(torch.tensor(-5.0)) * delta[0, 1])


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_ungated_layers_reproduce_the_peft_model(tiny_base, batch, method):
    peft_model = _peft_expert(tiny_base, method)
    try:
        with torch.no_grad():
            want = peft_model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits
        expert = expert_from_peft(peft_model)
    finally:
        peft_model.unload()
    with gated_experts(tiny_base.model, expert.modules, expert.adapter, expert.scaling) as layers:
        for layer in layers.values():
            layer.gate_enabled = False
        with torch.no_grad():
            got = tiny_base.model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, GatedExpertLinear) for m in tiny_base.model.modules())


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_gate_training_moves_only_the_gate(tiny_base, batch, method):
    peft_model = _peft_expert(tiny_base, method, seed=1)
    try:
        expert = expert_from_peft(peft_model)
    finally:
        peft_model.unload()
    base_before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    expert_before = {k: v.clone() for k, v in expert.adapter.items()}
    with gated_experts(tiny_base.model, expert.modules, expert.adapter, expert.scaling) as layers:
        optimiser = torch.optim.AdamW([layer.gate for layer in layers.values()], lr=1e-2,
                                      weight_decay=0.0)
        for _ in range(3):
            tiny_base.model(**batch).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        gates = gate_vectors(layers)
    after = tiny_base.model.state_dict()
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in after)
    assert all(torch.equal(expert.adapter[k], expert_before[k]) for k in expert_before)
    assert gates.keys() == {m.name for m in expert.modules}
    assert all(gate.abs().sum() > 0 for gate in gates.values())


def test_mean_activations_average_non_padding_inputs(tiny_base, batch):
    name = "model.layers.1.mlp.down_proj"
    d_in, d_out = tiny_base.spec().linears[name]
    spec = ModuleSpec(name, "ia3_in", d_in, d_out)
    adapter = {f"{name}.ia3": torch.full((d_in,), 2.0)}
    seen: list[torch.Tensor] = []
    with gated_experts(tiny_base.model, [spec], adapter, 1.0) as layers:
        handle = layers[name].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        means, tokens = mean_input_activations(tiny_base.model, layers, [batch])
        handle.remove()
        assert layers[name].gate_enabled  # restored after measuring with the gate off
    mask = batch["attention_mask"].bool()
    assert tokens == int(mask.sum())
    torch.testing.assert_close(means[name], seen[0][mask].mean(dim=0))
