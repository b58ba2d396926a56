"""Assembly on a real local Ray: versions hold the right experts by reference, are
content-addressed and immutable, write only what is new, and a failed assembly leaves the
previous version current."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from coordinator.ray_cluster import folder_files, parse_resources
from coordinator.store.versions import VersionStore
from coordinator.versions.assemble import (
    AssemblyConfig,
    assemble,
    build_key_shards,
    load_bundle_files,
    select_experts,
)
from coordinator.versions.assembler import Assembler
from protocol.bundle import GATES, load_bundle, save_bundle
from protocol.errors import FailedPrecondition, InvalidArgument, InvalidBundle
from routing.keys import KEY_FIELDS, expert_keys, read_key_shard
from routing.synthetic import random_bundle
from routing.version import KEY_FILE, KEYS_DIR
from tests.harness.stores import add_expert, commit, make_store

pytestmark = pytest.mark.usefixtures("ray_local")


def _experts(store, version_id: str) -> dict[str, str]:
    manifest = VersionStore(store.layout).manifest(version_id)
    return {e.name: e.expert_id for e in manifest.experts}


def test_assembly_refers_to_every_expert_and_records_lineage(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    a = add_expert(store, tiny_spec, "a", seed=1)
    b = add_expert(store, tiny_spec, "b", seed=2, method="ia3", contributor="bob")
    first = assemble(store, store.list_experts())
    assert first.created and _experts(store, first.version_id) == {
        "alice/a": a.expert_id, "bob/b": b.expert_id}
    assert first.manifest.parent is None and first.manifest.diff == "+alice/a +bob/b"
    weights = VersionStore(store.layout).router(first.version_id)
    bundle = load_bundle(store.bundle_folder(a.expert_id))
    module = "model.layers.1.mlp.down_proj"  # adapted by both the LoRA and the (IA)^3 expert
    keys = weights.modules[module]
    assert keys.experts == ["alice/a", "bob/b"] and keys.kinds == ["lora", "ia3_in"]
    assert torch.equal(keys.keys[0], bundle.gates[module])
    assert keys.paged and keys.rank == bundle.manifest.peft["rank"]

    a2 = add_expert(store, tiny_spec, "a", seed=3)  # alice replaces her expert "a"
    c = add_expert(store, tiny_spec, "c", seed=4)
    second = assemble(store, store.list_experts())
    assert _experts(store, second.version_id) == {
        "alice/a": a2.expert_id, "bob/b": b.expert_id, "alice/c": c.expert_id}
    assert second.manifest.parent == first.version_id
    assert second.manifest.diff == "+alice/c ~alice/a"
    assert VersionStore(store.layout).current_id() == second.version_id


def _files(root) -> dict[str, tuple[int, int]]:
    """relative path -> (inode, size) of every file under a store."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


def test_a_new_version_writes_only_the_new_key_shard_and_its_manifest(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    for seed in range(3):
        add_expert(store, tiny_spec, f"e{seed}", seed=seed)
    first = assemble(store, store.list_experts())
    new = add_expert(store, tiny_spec, "late", seed=9)
    before = _files(store.root)
    second = assemble(store, store.list_experts())
    after = _files(store.root)
    written = {path: size for path, (inode, size) in after.items()
               if before.get(path, (None, None))[0] != inode}
    shard = f"{KEYS_DIR}/{new.expert_id}/{KEY_FILE}"
    manifest = f"versions/{second.version_id}/version.json"
    assert set(written) == {shard, manifest, "versions/CURRENT"}, written
    assert written[manifest] < 2_000  # a few hundred bytes per expert, no tensors
    assert not set(before) - set(after)  # nothing of the first version was rewritten away
    assert second.new_experts == 1 and first.new_experts == 3


def test_key_shards_built_on_ray_equal_the_ones_derived_locally(tmp_path, tiny_spec):
    """Chunks of 2 experts with mixed kinds, ranks and modules, verified on Ray."""
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
    assert build_key_shards(store, entries, AssemblyConfig(chunk_size=2, in_flight=2),
                            tiny_spec.fingerprint) == 5
    assert build_key_shards(store, entries, AssemblyConfig(), tiny_spec.fingerprint) == 0
    for entry in entries:
        shard = read_key_shard(store.objects.local_folder(KEYS_DIR, entry.expert_id) / KEY_FILE)
        local = expert_keys(load_bundle(store.bundle_folder(entry.expert_id)))
        assert shard.modules == local.modules and shard.rank == local.rank
        assert set(shard.tensors) == set(local.tensors)
        assert all(torch.equal(shard.tensors[k], local.tensors[k]) for k in local.tensors)
        assert {k.rsplit(":", 1)[1] for k in shard.tensors} <= set(KEY_FIELDS)


def test_same_expert_set_gives_the_same_version(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    add_expert(store, tiny_spec, "a", seed=1)
    first = assemble(store, store.list_experts())
    again = assemble(store, store.list_experts())
    assert not again.created and again.version_id == first.version_id
    assert len(VersionStore(store.layout).all()) == 1


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
    good = assemble(store, store.list_experts())
    broken = add_expert(store, tiny_spec, "b", seed=2)
    gates = store.bundle_folder(broken.expert_id) / GATES
    gates.write_bytes(gates.read_bytes()[:-4] + b"\0\0\0\0")  # changed after acceptance
    with pytest.raises(InvalidBundle, match="sha256"):
        assemble(store, store.list_experts())
    assert not store.objects.exists(KEYS_DIR, broken.expert_id)
    versions = VersionStore(store.layout)
    assert versions.current_id() == good.version_id
    assert [p.name for p in versions.root.iterdir() if not p.name.isupper()] == [
        good.version_id]


def test_assembly_of_an_empty_store_is_refused(tmp_path, tiny_spec):
    store = make_store(tmp_path / "store", tiny_spec)
    with pytest.raises(FailedPrecondition, match="no experts"):
        assemble(store, store.list_experts())


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
            self.sizes.append(len(result.manifest.experts))
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
    current = VersionStore(store.layout).current_id()
    assert sorted(_experts(store, current)) == ["alice/a", "alice/b", "alice/c"]


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
