"""Packaging: a live peft model and its saved adapter folder give the same bundle tensors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from contributor.package import bundle_from_peft, expert_from_peft, load_peft_adapter
from protocol.bundle import load_bundle, save_bundle, validate_bundle
from protocol.errors import InvalidArgument
from routing.base import load_base


@pytest.fixture
def peft_model(method):
    """A peft model with non-trivial weights on a private tiny base (it gets wrapped)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    base = load_base("tiny-llama")
    spec = base.spec()
    config = LoraConfig(r=4, lora_alpha=1, target_modules="all-linear") if method == "lora" \
        else IA3Config()
    model = get_peft_model(base.model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    yield model, spec
    model.unload()


def test_bundle_from_peft_round_trips_through_disk(peft_model, tmp_path, method):
    model, spec = peft_model
    gates = {m.name: torch.randn(m.d_in) for m in expert_from_peft(model).modules}
    bundle = bundle_from_peft(model, spec, "e1", gates=gates, training={"expert_steps": 1})
    validate_bundle(bundle, spec)
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b"), spec)
    assert loaded.manifest.method == method
    assert [m.name for m in loaded.manifest.modules] == [m.name for m in bundle.manifest.modules]
    assert all(torch.equal(loaded.gates[k], gates[k]) for k in gates)
    if method == "lora":
        assert loaded.manifest.peft == {"rank": 4, "alpha": 1.0, "scaling": 0.25,
                                        "target_modules": ["down_proj", "gate_proj", "k_proj",
                                                           "o_proj", "q_proj", "up_proj",
                                                           "v_proj"]}
    else:
        assert loaded.manifest.peft["feedforward_modules"] == ["down_proj"]
        kinds = {m.name.rsplit(".", 1)[-1]: m.kind for m in loaded.manifest.modules}
        assert kinds == {"k_proj": "ia3_out", "v_proj": "ia3_out", "down_proj": "ia3_in"}


def test_saved_adapter_reads_back_identically(peft_model, tmp_path):
    model, spec = peft_model
    live = expert_from_peft(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_peft_adapter(tmp_path / "adapter", spec)
    assert (saved.method, saved.peft, saved.modules) == (live.method, live.peft, live.modules)
    assert saved.adapter.keys() == live.adapter.keys()
    assert all(torch.equal(saved.adapter[k], live.adapter[k]) for k in live.adapter)


def test_missing_gates_default_to_zero_vectors(peft_model):
    model, spec = peft_model
    bundle = bundle_from_peft(model, spec, "e2")
    assert all(torch.equal(g, torch.zeros_like(g)) for g in bundle.gates.values())


@pytest.mark.parametrize("edit, expected", [
    ({"peft_type": "LOHA"}, "a 'LOHA' adapter cannot be routed"),
    ({"use_dora": True}, "DoRA (use_dora) cannot be routed"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module ranks (rank_pattern) cannot be routed"),
    ({"lora_bias": True}, "LoRA with a trained bias (lora_bias) cannot be routed"),
    ({"bias": "all"}, "trained biases (bias='all') cannot be routed"),
    ({"init_lora_weights": "pissa"}, "pissa initialisation"),
])
def test_unsupported_adapter_configs_are_refused(peft_model, tmp_path, method, edit, expected):
    model, spec = peft_model
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(InvalidArgument, match=re.escape(expected)):
        load_peft_adapter(tmp_path / "adapter", spec)


def test_adapter_for_unknown_modules_is_refused(peft_model, tmp_path, method):
    from safetensors.torch import load_file, save_file

    model, spec = peft_model
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    with pytest.raises(InvalidArgument, match="layers.7.* is not a linear layer"):
        load_peft_adapter(tmp_path / "adapter", spec)
