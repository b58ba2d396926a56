"""Assembly on a real local Ray: versions hold the right experts, are content-addressed and
immutable, and a failed assembly leaves the previous version current."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from coordinator.ray_cluster import folder_files, parse_resources
from coordinator.store.versions import ROUTER_DIR, VersionStore
from coordinator.versions.assemble import (
    AssemblyConfig,
    assemble,
    build_router,
    load_bundle_files,
    select_experts,
)
from coordinator.versions.scheduler import Assembler
from protocol.bundle import GATES, load_bundle, save_bundle
from protocol.errors import FailedPrecondition, InvalidArgument, InvalidBundle
from routing.stack import stack_experts
from routing.synthetic import random_bundle
from routing.version import load_router
from tests.harness.stores import add_expert, commit, make_store

pytestmark = pytest.mark.usefixtures("ray_local")


def _experts(store_root, version_id: str) -> dict[str, str]:
    manifest = VersionStore(store_root).manifest(version_id)
    return {e["name"]: e["expert_id"] for e in manifest["experts"]}


def test_assembly_stacks_every_expert_and_records_lineage(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    a = add_expert(store, tiny_spec, "a", seed=1)
    b = add_expert(store, tiny_spec, "b", seed=2, method="ia3", contributor="bob")
    first = assemble(store.root, store.list_experts())
    assert first.created and _experts(store.root, first.version_id) == {
        "alice/a": a.expert_id, "bob/b": b.expert_id}
    assert first.manifest["parent"] is None and first.manifest["diff"] == "+alice/a +bob/b"
    weights = load_router(VersionStore(store.root).folder(first.version_id) / ROUTER_DIR)
    bundle = load_bundle(a.path)
    module = "model.layers.1.mlp.down_proj"  # adapted by both the LoRA and the (IA)^3 expert
    stacked = weights.modules[module]
    assert stacked.experts == ["alice/a", "bob/b"]
    assert torch.equal(stacked.keys[0], bundle.gates[module])
    assert torch.equal(stacked.lora_A[0], bundle.adapter[f"{module}.lora_A"])

    a2 = add_expert(store, tiny_spec, "a", seed=3)  # alice replaces her expert "a"
    c = add_expert(store, tiny_spec, "c", seed=4)
    second = assemble(store.root, store.list_experts())
    assert _experts(store.root, second.version_id) == {
        "alice/a": a2.expert_id, "bob/b": b.expert_id, "alice/c": c.expert_id}
    assert second.manifest["parent"] == first.version_id
    assert second.manifest["diff"] == "+alice/c ~alice/a"
    assert VersionStore(store.root).current_id() == second.version_id


def test_chunked_stacking_on_ray_equals_stacking_all_at_once(tmp_path, tiny_spec):
    """Chunks of 2 experts with mixed kinds and ranks, joined, equal `stack_experts`."""
    store = make_store(tmp_path / "store", tiny_spec)
    down = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    bundles = [random_bundle(tiny_spec, "e0", rank=2, seed=1, modules=down[:1]),
               random_bundle(tiny_spec, "e1", method="ia3", seed=2, with_activations=True),
               random_bundle(tiny_spec, "e2", rank=4, seed=3, modules=down),
               random_bundle(tiny_spec, "e3", method="ia3", seed=4),
               random_bundle(tiny_spec, "e4", rank=1, seed=5, with_activations=True)]
    for bundle in bundles:
        commit(store, bundle)
    entries = select_experts(store.list_experts())
    joined = build_router(entries, AssemblyConfig(chunk_size=2), tiny_spec.fingerprint)
    loaded = [load_bundle(e.path) for e in entries]
    for bundle, entry in zip(loaded, entries, strict=True):
        bundle.manifest.name = entry.name  # the router knows experts by contributor/name
    reference = stack_experts(loaded)
    assert joined.experts == reference.experts and set(joined.modules) == set(reference.modules)
    for name, expected in reference.modules.items():
        got = joined.modules[name]
        assert (got.experts, got.kinds) == (expected.experts, expected.kinds), name
        for field in ("keys", "prototypes", "scaling", "activations", "lora_A", "lora_B",
                      "ia3_out", "ia3_in"):
            want, have = getattr(expected, field), getattr(got, field)
            assert (want is None) == (have is None), (name, field)
            if want is not None:
                assert torch.equal(want, have), (name, field)


def test_same_expert_set_gives_the_same_version(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    add_expert(store, tiny_spec, "a", seed=1)
    first = assemble(store.root, store.list_experts())
    again = assemble(store.root, store.list_experts())
    assert not again.created and again.version_id == first.version_id
    assert len(VersionStore(store.root).all()) == 1


def test_experts_are_keyed_by_contributor_and_name_so_none_shadows_another(tmp_path,
                                                                          tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    add_expert(store, tiny_spec, "sentiment", seed=1, contributor="alice")
    add_expert(store, tiny_spec, "sentiment", seed=2, contributor="bob")
    # A name spelling another contributor's key, as the old `contributor.name` scheme did.
    add_expert(store, tiny_spec, "alice.sentiment", seed=3, contributor="carol")
    names = [e.name for e in select_experts(store.list_experts())]
    assert names == ["alice/sentiment", "bob/sentiment", "carol/alice.sentiment"]


def test_failed_assembly_leaves_the_previous_version_current(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    add_expert(store, tiny_spec, "a", seed=1)
    good = assemble(store.root, store.list_experts())
    broken = add_expert(store, tiny_spec, "b", seed=2)
    gates = broken.path / GATES
    gates.write_bytes(gates.read_bytes()[:-4] + b"\0\0\0\0")  # changed after acceptance
    with pytest.raises(InvalidBundle, match="sha256"):
        assemble(store.root, store.list_experts())
    versions = VersionStore(store.root)
    assert versions.current_id() == good.version_id
    assert [p.name for p in versions.root.iterdir() if not p.name.isupper()] == [
        good.version_id]


def test_assembly_of_an_empty_store_is_refused(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    with pytest.raises(FailedPrecondition, match="no experts"):
        assemble(store.root, store.list_experts())


class _SlowAssembler(Assembler):
    """Records how many assemblies overlap; the first one is slow so others arrive during it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.running = 0
        self.most_running = 0
        self.counted = threading.Lock()
        self.sizes: list[int] = []

    def _assemble(self, records):
        with self.counted:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if not self.sizes:
                time.sleep(1.5)
            result = super()._assemble(records)
            self.sizes.append(len(result.manifest["experts"]))
            return result
        finally:
            with self.counted:
                self.running -= 1


def test_experts_accepted_during_an_assembly_go_into_the_next_one(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    assembler = _SlowAssembler(store).start()
    try:
        assert assembler.wait_idle(60)
        started = time.perf_counter()
        assembler.on_accepted(add_expert(store, tiny_spec, "a", seed=1))
        assert time.perf_counter() - started < 0.5  # the hook never waits for assembly
        time.sleep(0.3)  # the first assembly is now running (it sleeps 1.5 s)
        for name, seed in (("b", 2), ("c", 3)):
            assembler.on_accepted(add_expert(store, tiny_spec, name, seed=seed))
        assert assembler.wait_idle(120), assembler.last_error
    finally:
        assembler.close()
    assert assembler.most_running == 1
    assert assembler.sizes == [1, 3]  # b and c went together into the second assembly
    current = VersionStore(store.root).current_id()
    assert sorted(_experts(store.root, current)) == ["alice/a", "alice/b", "alice/c"]


def test_ray_resources_are_names_with_positive_amounts():
    assert parse_resources(["gaggle_worker=1", "gpu_node=0.5"]) == (
        ("gaggle_worker", 1.0), ("gpu_node", 0.5))
    assert AssemblyConfig(resources=parse_resources(["a=2"])).ray_options() == {
        "resources": {"a": 2.0}}
    assert AssemblyConfig().ray_options() == {}
    for bad in ("gaggle_worker", "=1", "a=0", "a=-1", "a=many"):
        with pytest.raises(InvalidArgument, match="NAME=AMOUNT"):
            parse_resources([bad])


def test_bundle_bytes_are_reverified_where_they_are_loaded(tmp_path, tiny_spec):
    """What a Ray task receives is checked like a bundle on disk: a changed byte is refused."""
    bundle = random_bundle(tiny_spec, "a", seed=1)
    files = folder_files(save_bundle(bundle, tmp_path / "a"))
    assert load_bundle_files(files).expert_id == bundle.expert_id
    gates = bytearray(files[GATES])
    gates[-1] ^= 1
    with pytest.raises(InvalidBundle, match="sha256"):
        load_bundle_files({**files, GATES: bytes(gates)})
    with pytest.raises(InvalidBundle, match="missing from the store"):
        folder_files(tmp_path / "gone")
