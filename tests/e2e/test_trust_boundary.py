"""The coordinator's promises to independent, possibly hostile contributors, against a real
`serve` process called with the bare generated stub (as an outside client would):

- the manifest is a closed schema: every key known, strings and numbers bounded, no nesting
  past the schema's and no duplicate keys, safetensors metadata limited, training figures
  from a fixed vocabulary; the stored manifest is exactly the bytes the expert id covers;
- safetensors headers hold tensors and nothing else; gates that the router's layer norm
  would turn into zero keys, and updates far beyond the base weight, are no trained expert;
- the base model's name in a manifest is the contributor's label: versions record the
  coordinator's own;
- error messages are short and name no server path;
- experts are keyed by contributor and name, so no contributor shadows another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from coordinator.store.versions import VersionStore
from protocol.bundle import ADAPTER, GATES, MANIFEST, sha256_file
from protocol.status import MAX_MESSAGE_BYTES
from tests.harness.bundles import archive_of, make_bundle, raw_upload, store_snapshot
from tests.harness.servers import add_token, seed_base_spec, start_coordinator, wait_for

BIG = "x" * 100_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("trust")
    seed_base_spec(root / "store", tiny_spec)
    process = start_coordinator(root / "store")
    yield process
    process.stop()


def edit_manifest(folder: Path, edit) -> Path:
    """Rewrite manifest.json with `edit(text) -> text` (raw text: duplicate keys, depth)."""
    path = folder / MANIFEST
    path.write_text(edit(path.read_text()))
    return folder


def edit_json(folder: Path, edit) -> Path:
    def rewrite(text: str) -> str:
        manifest = json.loads(text)
        edit(manifest)
        return json.dumps(manifest)
    return edit_manifest(folder, rewrite)


def with_adapter_metadata(folder: Path, metadata: dict) -> Path:
    tensors = load_file(folder / ADAPTER)
    save_file(tensors, folder / ADAPTER, metadata=metadata)
    return edit_json(folder, lambda m: m["files"].update({ADAPTER: sha256_file(
        folder / ADAPTER)}))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def with_tensors(folder: Path, file: str, edit) -> Path:
    """Rewrite a tensor file with `edit(tensors)` and put its new sha256 in the manifest."""
    tensors = load_file(folder / file)
    edit(tensors)
    save_file(tensors, folder / file)
    return edit_json(folder, lambda m: m["files"].update({file: sha256_file(folder / file)}))


def with_header_note(folder: Path) -> Path:
    """64 KB of text beside a tensor's dtype, shape and offsets in the adapter's header."""
    path = folder / ADAPTER
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header[next(k for k in header if k != "__metadata__")]["note"] = "x" * 64_000
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    return edit_json(folder, lambda m: m["files"].update({ADAPTER: sha256_file(path)}))


def _all(tensors: dict, value: float) -> None:
    for key, tensor in tensors.items():
        tensors[key] = torch.full_like(tensor, value)


def _alternating(tensors: dict, value: float) -> None:
    for key, tensor in tensors.items():
        tensors[key] = torch.where(torch.rand_like(tensor) < 0.5, value, -value)


# Each case breaks one promise of the schema; the name says which.
HOSTILE = {
    "huge_base_name": lambda f: edit_json(f, lambda m: m["base_model"].update(name=BIG)),
    "extra_key_in_base_model": lambda f: edit_json(f, lambda m: m["base_model"].update(
        note="text")),
    "extra_key_in_peft": lambda f: edit_json(f, lambda m: m["peft"].update(note=BIG)),
    "text_as_training_key": lambda f: edit_json(f, lambda m: m["training"].update(
        {"patient_alice_has_diabetes": 1})),
    "huge_training_curve": lambda f: edit_json(f, lambda m: m["training"].update(
        expert_loss_curve=[1.0] * 5000)),
    "duplicate_key": lambda f: edit_manifest(f, lambda t: t.replace(
        '"method":', '"method":"ia3","method":', 1)),
    "peft_nested_600": lambda f: edit_manifest(f, lambda t: t.replace(
        '"peft":{', f'"peft":{{"deep":{nested(600)},', 1)),
    "peft_nested_300": lambda f: edit_manifest(f, lambda t: t.replace(
        '"peft":{', f'"peft":{{"deep":{nested(300)},', 1)),
    "scaling_infinite_in_float32": lambda f: edit_json(f, lambda m: m["peft"].update(
        scaling=1e39)),
    "nan_constant": lambda f: edit_manifest(f, lambda t: t.replace(
        '"format_version":1', '"format_version":NaN', 1)),
    "safetensors_metadata_text": lambda f: with_adapter_metadata(f, {"note": BIG}),
    "text_in_a_tensor_header_entry": with_header_note,
    "constant_gates": lambda f: with_tensors(f, GATES, lambda t: _all(t, 1.0)),
    "update_of_1e10_everywhere": lambda f: with_tensors(f, ADAPTER,
                                                        lambda t: _alternating(t, 1e10)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_manifest_outside_the_schema_is_refused_briefly_and_stores_nothing(server, tmp_path,
                                                                          tiny_spec, case):
    token = add_token(server.store, f"hostile-{case.replace('_', '-')}"[:64])
    folder = HOSTILE[case](make_bundle(tmp_path / "b", tiny_spec, "sentiment"))
    before = store_snapshot(server.store)
    with server.channel() as channel:
        outcome = raw_upload(channel, token, archive_of(folder))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (case, outcome)
    assert len(outcome.details.encode()) <= MAX_MESSAGE_BYTES
    assert str(server.store) not in outcome.details and "/tmp" not in outcome.details
    assert store_snapshot(server.store) == before
    assert "Traceback" not in server.log()


def test_error_messages_quote_a_short_prefix_and_no_server_path(server, tmp_path, tiny_spec):
    token = add_token(server.store, "long-namer")
    folder = edit_json(make_bundle(tmp_path / "b", tiny_spec, "sentiment"),
                       lambda m: m.update(name="N" * 100_000))
    with server.channel() as channel:
        outcome = raw_upload(channel, token, archive_of(folder))
        # Without the bound, this message would pass gRPC's metadata limit and arrive as
        # RESOURCE_EXHAUSTED "Stream removed" instead of the real error.
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert "manifest.name" in outcome.details and "100000 chars" in outcome.details
        assert len(outcome.details.encode()) <= MAX_MESSAGE_BYTES
        missing = make_bundle(tmp_path / "m", tiny_spec, "sentiment")
        (missing / "gates.safetensors").unlink()
        outcome = raw_upload(channel, token, archive_of(missing))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "gates.safetensors" in outcome.details
    assert str(server.store) not in outcome.details and "staging" not in outcome.details


def test_versions_key_experts_by_contributor_and_record_the_coordinators_base(server,
                                                                             tmp_path,
                                                                             tiny_spec):
    uploads = []
    with server.channel() as channel:
        for contributor, seed in (("alice", 1), ("bob", 2)):
            folder = make_bundle(tmp_path / contributor, tiny_spec, "sentiment", seed=seed)
            # Another base name with the right fingerprint, and a pretty-printed manifest:
            # both accepted, neither what the coordinator records.
            edit_json(folder, lambda m: m["base_model"].update(name="someone-elses-model"))
            edit_manifest(folder, lambda t: json.dumps(json.loads(t), indent=2))
            outcome = raw_upload(channel, add_token(server.store, contributor),
                                 archive_of(folder))
            assert outcome.code == grpc.StatusCode.OK, outcome
            uploads.append(outcome.expert_id)
    for expert_id in uploads:
        stored = (server.store / "experts" / expert_id / MANIFEST).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == expert_id  # the id covers every byte

    def both_in_current():
        versions = VersionStore(server.store)
        current = versions.current_id()
        manifest = versions.manifest(current) if current else None
        return manifest if manifest and set(uploads) <= set(manifest.expert_ids) else None

    manifest = wait_for(both_in_current, 180, f"a version with both experts:\n{server.log()}")
    keys = sorted(e.name for e in manifest.experts if e.expert_id in uploads)
    assert keys == ["alice/sentiment", "bob/sentiment"]
    assert manifest.base_model == "tiny-llama"
    folder = VersionStore(server.store).folder(manifest.version_id)
    assert VersionStore(server.store).router(manifest.version_id).base_model == "tiny-llama"
    assert "bob/sentiment" in manifest.diff or "alice/sentiment" in manifest.diff
    # The usage (poisoning) check loads the coordinator's base, so it runs and keys by
    # contributor too; a contributor's base label used to switch it off.
    usage = wait_for(lambda: (folder / "usage.json").is_file() and json.loads(
        (folder / "usage.json").read_text()), 180, f"usage.json:\n{server.log()}")
    assert {"alice/sentiment", "bob/sentiment"} <= set(usage["experts"])


def with_size_field(archive: bytes, field: bytes) -> bytes:
    """The archive with its first header's size field replaced (and its checksum fixed)."""
    header = bytearray(archive[:512])
    header[124:136] = field.ljust(12, b"\0")
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header) + archive[512:]


@pytest.mark.parametrize("field", [b"-0000000001", b"+0000001750", b"0o1750", b"1_750", b"",
                                   b"0000001750\n"])
def test_tar_sizes_must_be_plain_octal(server, tmp_path, tiny_spec, field):
    token = add_token(server.store, "tar-sizer")
    archive = with_size_field(archive_of(make_bundle(tmp_path / "b", tiny_spec, "e")), field)
    before = store_snapshot(server.store)
    with server.channel() as channel:
        outcome = raw_upload(channel, token, archive)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "size is not an octal number" in outcome.details
    assert store_snapshot(server.store) == before
