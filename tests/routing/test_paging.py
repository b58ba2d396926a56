"""A router by reference (keys in memory, adapters paged in from bundle files) gives the
all-in-memory router's outputs and choices, whatever the paging bound."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import InvalidArgument
from routing.base import load_base
from routing.keys import expert_keys, key_shard_bytes, read_key_shard
from routing.methods import METHODS
from routing.paging import AdapterFiles, AdapterPool
from routing.router import route, routing_inputs, unroute
from routing.stack import stack_experts
from routing.synthetic import random_bundle
from routing.trace import capture_routing
from routing.version import load_router, save_version

PAGED_METHODS = [m for m in METHODS if not m.startswith("single:")] + ["single:l2"]


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-llama")


@pytest.fixture(scope="module")
def bundles(base):
    spec = base.spec()
    lora = [random_bundle(spec, f"l{i}", seed=i, rank=2 + 2 * (i % 3), with_activations=True)
            for i in range(5)]
    ia3 = [random_bundle(spec, f"i{i}", method="ia3", seed=10 + i, with_activations=True)
           for i in range(2)]
    return lora + ia3


@pytest.fixture(scope="module")
def folder(bundles, tmp_path_factory):
    return save_version(bundles, tmp_path_factory.mktemp("paged") / "version")


@pytest.fixture(autouse=True)
def _unrouted(base):
    yield
    unroute(base.model)


def run(model, method: str):
    tokens = torch.randint(0, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), capture_routing(model) as trace:
        if method == "retrieval":
            with routing_inputs(model, expert_index=torch.tensor([0, 3, 6])):
                out = model(tokens).logits
        else:
            out = model(tokens).logits
    return out, {m: trace.choices(m) for m in trace.records}


def one_expert_bytes(weights) -> int:
    return weights.adapters._expert_bytes


@pytest.mark.parametrize("method", PAGED_METHODS)
@pytest.mark.parametrize("bound", ["all", "three", "one"])
def test_paged_router_equals_the_in_memory_router(base, bundles, folder, method, bound):
    expected, expected_choices = run(route(base, stack_experts(bundles), method, top_k=2),
                                     method)
    unroute(base.model)
    probe = load_router(folder)
    slots = {"all": len(bundles), "three": 3, "one": 1}[bound]
    weights = load_router(folder, max_adapter_bytes=slots * one_expert_bytes(probe))
    got, choices = run(route(base, weights, method, top_k=2), method)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert choices.keys() == expected_choices.keys()
    for module, picked in choices.items():
        assert torch.equal(picked, expected_choices[module]), module
    assert weights.adapters.resident_bytes() <= weights.adapters.max_bytes


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_paged_dispatches_agree_with_each_other(base, folder, dispatch):
    weights = load_router(folder)
    got, _ = run(route(base, weights, "phatgoose", top_k=2, dispatch=dispatch), "phatgoose")
    unroute(base.model)
    reference, _ = run(route(base, load_router(folder), "phatgoose", top_k=2,
                             dispatch="dense"), "phatgoose")
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)


def test_only_the_picked_experts_are_read(base, bundles, folder):
    weights = load_router(folder)
    route(base, weights, "single:l1", top_k=1)
    run(base.model, "single:l1")
    resident = {p.name: p.owner[:p.size].tolist() for p in weights.adapters.modules.values()}
    assert resident and all(owners == [1] for owners in resident.values())  # expert l1 only


def test_a_bound_below_one_expert_is_refused(folder):
    with pytest.raises(InvalidArgument, match="not even one expert"):
        load_router(folder, max_adapter_bytes=100)


def test_key_shard_round_trips_and_is_deterministic(bundles, tmp_path):
    keys = expert_keys(bundles[0])
    data = key_shard_bytes(keys)
    assert data == key_shard_bytes(expert_keys(bundles[0]))
    (tmp_path / "k.safetensors").write_bytes(data)
    back = read_key_shard(tmp_path / "k.safetensors", ("keys",))
    assert back.expert_id == bundles[0].expert_id and back.rank == keys.rank
    assert set(back.tensors) == {k for k in keys.tensors if k.endswith(":keys")}
    for name, tensor in back.tensors.items():
        assert torch.equal(tensor, keys.tensors[name])


def test_adapter_files_read_exactly_the_stored_tensor(bundles, folder):
    bundle = bundles[0]
    files = AdapterFiles(lambda position: folder / "experts" / bundle.expert_id)
    name = next(iter(bundle.adapter))
    assert torch.equal(files.read(0, name), bundle.adapter[name])
    with pytest.raises(InvalidArgument, match="holds no tensor"):
        files.read(0, "model.nothing.lora_A")
    pool = AdapterPool(files, 1 << 20)
    assert pool.resident_bytes() == 0
