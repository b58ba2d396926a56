"""Every supported architecture family end to end on a tiny random model: train two experts
(different module sets) and their gates, bundle, submit over real gRPC, assemble on real Ray,
route and generate, in float32 and on the base loaded in bf16."""

from __future__ import annotations

import random

import pytest
import torch

from contributor.client import Connection, CoordinatorClient
from contributor.data import Example, tokenize
from contributor.package import bundle_from_expert
from contributor.train import TrainConfig, train_expert, train_gates
from coordinator.server import CoordinatorServer, ServerConfig
from coordinator.service.auth import TokenBook
from coordinator.store.experts import Store
from coordinator.store.versions import VersionStore
from coordinator.versions.assemble import assemble_store
from protocol.bundle import save_bundle, validate_bundle
from routing.base import load_base
from routing.layers import RoutedLinear
from routing.router import route, unroute
from tests.routing.families import FAMILIES, save_family

FAST = {"steps": 4, "gate_steps": 3, "batch_size": 4, "max_length": 24,
        "activation_examples": 8, "lr": 2e-2, "gate_lr": 2e-2}


def _examples(tokenizer, seed: int) -> list:
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(12)]
    return tokenize([Example(f"{a} plus {b} is", f" {a + b}") for a, b in pairs], tokenizer, 24)


def _trained_bundle(base, name: str, seed: int, targets: str | None):
    config = TrainConfig(**FAST, seed=seed, target_modules=targets)
    examples = _examples(base.tokenizer, seed)
    expert, losses = train_expert(base, examples, config)
    gates, activations, _ = train_gates(base, expert, examples, config)
    bundle = bundle_from_expert(expert, base.spec(), name, gates=gates, activations=activations,
                                training={"expert_steps": len(losses)})
    validate_bundle(bundle, base.spec())
    return bundle


def _submit(store_root, base, folders) -> None:
    store = Store(store_root)
    store.cache_base_spec(base.spec())
    token = TokenBook(store).add("alice")
    store.close()
    server = CoordinatorServer(ServerConfig(store=store_root, base=base.name, port=0,
                                            assembly=False))
    server.start()
    try:
        with CoordinatorClient(Connection(f"127.0.0.1:{server.port}", token)) as client:
            for folder in folders:
                client.submit(folder)
    finally:
        server.stop()


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_submits_assembles_routes_and_generates(family, tmp_path):
    base = load_base(str(save_family(family, tmp_path / family)))
    first_linear = next(iter(base.spec().linears)).rsplit(".", 1)[-1]
    bundles = [_trained_bundle(base, "everywhere", 1, None),  # LoRA on all linears
               _trained_bundle(base, "one-kind", 2, first_linear)]
    assert {m.name.rsplit(".", 1)[-1] for m in bundles[1].manifest.modules} == {first_linear}
    folders = []
    for bundle in bundles:
        save_bundle(bundle, tmp_path / bundle.name)
        folders.append(tmp_path / bundle.name)
    _submit(tmp_path / "store", base, folders)

    store = Store(tmp_path / "store")
    result = assemble_store(store)
    weights = VersionStore(store.layout).router(result.version_id)
    store.close()
    assert weights.experts == ["alice/everywhere", "alice/one-kind"]
    prompt = base.tokenizer("3 plus 4 is", return_tensors="pt")
    with torch.no_grad():
        plain = base.model(**prompt).logits
        route(base, weights, top_k=2)
        routed_layers = [m for m in base.model.modules() if isinstance(m, RoutedLinear)]
        routed = base.model(**prompt).logits
        generated = base.model.generate(**prompt, max_new_tokens=4, min_new_tokens=4,
                                        do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
    unroute(base.model)
    assert len(routed_layers) == len(base.spec().linears)
    assert torch.isfinite(routed).all() and not torch.allclose(routed, plain)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4

    # the same version routes the base loaded in bf16: one fingerprint, the base's dtype
    half = load_base(base.name, dtype="bfloat16")
    with torch.no_grad():
        route(half, weights, top_k=2)
        half_logits = half.model(**prompt).logits
        half.model.generate(**prompt, max_new_tokens=2, do_sample=False,
                            pad_token_id=half.tokenizer.pad_token_id)
    assert half_logits.dtype == torch.bfloat16
    assert torch.allclose(half_logits.float(), routed, atol=0.1, rtol=0.05)
