"""Exported router versions: safetensors + JSON round trip, tamper and guard checks."""

from __future__ import annotations

import json

import pytest
import torch

from protocol.errors import FailedPrecondition, InvalidArgument
from routing.base import load_base
from routing.router import route, unroute
from routing.stack import stack_experts
from routing.synthetic import random_bundle
from routing.version import ROUTER_MANIFEST, ROUTER_TENSORS, load_router, save_router


@pytest.fixture(scope="module")
def weights(tiny_spec):
    bundles = [random_bundle(tiny_spec, "lora", seed=1, with_activations=True),
               random_bundle(tiny_spec, "ia3", method="ia3", seed=2, with_activations=True)]
    return stack_experts(bundles)


def test_save_load_round_trip_is_exact(tmp_path, weights):
    folder = save_router(weights, tmp_path / "v1", metadata={"version": 1})
    loaded = load_router(folder)
    assert (loaded.base_model, loaded.fingerprint, loaded.experts) == \
        (weights.base_model, weights.fingerprint, weights.experts)
    assert loaded.modules.keys() == weights.modules.keys()
    for name, module in weights.modules.items():
        other = loaded.modules[name]
        assert (other.experts, other.kinds, other.d_in, other.d_out) == \
            (module.experts, module.kinds, module.d_in, module.d_out)
        for field in ("keys", "prototypes", "scaling", "activations", "lora_A", "lora_B",
                      "ia3_out", "ia3_in"):
            mine, theirs = getattr(module, field), getattr(other, field)
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), field
    manifest = json.loads((folder / ROUTER_MANIFEST).read_text())
    assert manifest["metadata"] == {"version": 1}


def test_loaded_router_routes_like_the_original(tmp_path, weights):
    base = load_base("tiny-llama")
    tokens = torch.randint(0, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = route(base, weights)(tokens).logits
        got = route(base, load_router(save_router(weights, tmp_path / "v")))(tokens).logits
    unroute(base.model)
    assert torch.equal(got, expected)


def test_tampered_tensors_are_refused(tmp_path, weights):
    folder = save_router(weights, tmp_path / "v")
    data = bytearray((folder / ROUTER_TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (folder / ROUTER_TENSORS).write_bytes(bytes(data))
    with pytest.raises(InvalidArgument, match="sha256"):
        load_router(folder)


def test_reloaded_zero_keys_are_refused(tmp_path, weights, tiny_base):
    module = next(iter(weights.modules.values()))
    saved = module.keys.clone()
    module.keys[1] = 0.0
    try:
        folder = save_router(weights, tmp_path / "zero")
    finally:
        module.keys.copy_(saved)
    with pytest.raises(FailedPrecondition, match="all zero"):
        route(load_base("tiny-llama"), load_router(folder))


def test_missing_folder_and_existing_target_are_explained(tmp_path, weights):
    with pytest.raises(InvalidArgument, match="not a router folder"):
        load_router(tmp_path / "nothing")
    save_router(weights, tmp_path / "v")
    with pytest.raises(FileExistsError):
        save_router(weights, tmp_path / "v")
    save_router(weights, tmp_path / "v", overwrite=True)
