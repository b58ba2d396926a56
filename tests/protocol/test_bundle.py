"""The bundle format: round trip, and each validation failure names its problem."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from protocol.archive import ArchiveDigest, extract_members, pack_bundle_bytes
from protocol.bundle import (
    ACTIVATIONS,
    ADAPTER,
    GATES,
    MANIFEST,
    BaseSpec,
    check_gates_trained,
    check_update_norms,
    load_bundle,
    save_bundle,
    sha256_file,
    validate_bundle,
)
from protocol.errors import FingerprintMismatch, GaggleError, InvalidBundle
from routing.synthetic import random_bundle


@pytest.fixture(params=["lora", "ia3"])
def saved(request, tiny_spec, tmp_path):
    bundle = random_bundle(tiny_spec, f"expert-{request.param}", method=request.param,
                           with_activations=True)
    return save_bundle(bundle, tmp_path / "bundle"), bundle


def test_round_trip_keeps_every_tensor_and_field(saved, tiny_spec):
    path, original = saved
    loaded = load_bundle(path, tiny_spec)
    assert loaded.manifest.to_json() == original.manifest.to_json()
    for name in ("adapter", "gates", "activations"):
        mine, theirs = getattr(original, name), getattr(loaded, name)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.expert_id == original.expert_id


def test_expert_id_changes_with_content(tiny_spec, tmp_path):
    one = save_bundle(random_bundle(tiny_spec, "a", seed=1), tmp_path / "one")
    two = save_bundle(random_bundle(tiny_spec, "a", seed=2), tmp_path / "two")
    assert load_bundle(one).expert_id != load_bundle(two).expert_id


def _rewrite_tensor(path, file, key, value):
    tensors = {k: v for k, v in load_bundle_raw(path, file).items()}
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, path / file)
    _rehash(path)


def load_bundle_raw(path, file):
    from safetensors.torch import load_file

    return load_file(path / file)


def _rehash(path):
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"] = {f: sha256_file(path / f) for f in manifest["files"]}
    (path / MANIFEST).write_text(json.dumps(manifest))


def _edit_manifest(path, edit):
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _first_gate(path):
    return sorted(load_bundle_raw(path, GATES))[0]


CASES = {
    "nan": (lambda p: _rewrite_tensor(p, GATES, _first_gate(p),
                                      torch.full_like(load_bundle_raw(p, GATES)[_first_gate(p)],
                                                      math.nan)), "NaN or Inf"),
    "inf": (lambda p: _rewrite_tensor(p, ACTIVATIONS, _first_gate(p), torch.full_like(
        load_bundle_raw(p, ACTIVATIONS)[_first_gate(p)], math.inf)), "NaN or Inf"),
    "shape": (lambda p: _rewrite_tensor(p, GATES, _first_gate(p), torch.zeros(7)),
              "has shape (7,)"),
    "dtype": (lambda p: _rewrite_tensor(p, GATES, _first_gate(p),
                                        torch.zeros(32, dtype=torch.float16)), "dtype"),
    "zero_gate": (lambda p: _rewrite_tensor(p, GATES, _first_gate(p), torch.zeros_like(
        load_bundle_raw(p, GATES)[_first_gate(p)])), "is all zero"),
    "gate_missing": (lambda p: _rewrite_tensor(p, GATES, _first_gate(p), None),
                     "a module without a gate"),
    "extra_tensor": (lambda p: _rewrite_tensor(p, GATES, "model.bogus", torch.zeros(32)),
                     "unknown tensors"),
    "unknown_module": (lambda p: _edit_manifest(p, lambda m: m["modules"][0].update(
        name="model.layers.9.mlp.up_proj")), "module model.layers.9.mlp.up_proj"),
    "format_version": (lambda p: _edit_manifest(p, lambda m: m.update(format_version=99)),
                       "format_version is 99"),
    "missing_file": (lambda p: (p / GATES).unlink(), "missing files ['gates.safetensors']"),
    "extra_file": (lambda p: (p / "notes.txt").write_text("hi"), "extra files ['notes.txt']"),
    "hash": (lambda p: (p / ADAPTER).write_bytes((p / ADAPTER).read_bytes()[:-4] + b"\0\0\0\0"),
             "sha256 does not match"),
    "text_in_training": (lambda p: _edit_manifest(p, lambda m: m["training"].update(
        note="some private sentence")), "carries no text"),
    "bad_safetensors": (lambda p: ((p / GATES).write_bytes(b"\xff" * 8 + b"{}"), _rehash(p)),
                        "not a valid safetensors"),
    "bad_json": (lambda p: (p / MANIFEST).write_text("{not json"), "not valid UTF-8 JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_rejects(case, saved, tiny_spec):
    path, _ = saved
    corrupt, message = CASES[case]
    corrupt(path)
    with pytest.raises(InvalidBundle, match=None) as info:
        load_bundle(path, tiny_spec)
    assert message in str(info.value)


def test_zero_gate_is_refused_naming_the_file_the_module_and_the_fix(tiny_spec, tmp_path):
    bundle = random_bundle(tiny_spec, "untrained")
    module = sorted(bundle.gates)[1]
    bundle.gates[module] = torch.zeros_like(bundle.gates[module])
    with pytest.raises(InvalidBundle) as info:
        validate_bundle(bundle, tiny_spec)
    assert info.value.field == GATES and info.value.status == "INVALID_ARGUMENT"
    message = str(info.value)
    assert message.startswith(f"{GATES}: the gate of module {module} is all zero")
    assert "retrain the gate with gaggle-contributor gate" in message
    with pytest.raises(InvalidBundle, match="all zero"):
        save_bundle(bundle, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    bundle.gates[module] = torch.full_like(bundle.gates[module], 1.0)  # constant: zero key
    with pytest.raises(InvalidBundle, match="all zero or constant"):
        validate_bundle(bundle, tiny_spec)
    bundle.gates[module][0] = 1.01  # a gate that moved, however little
    validate_bundle(bundle, tiny_spec)


def test_gate_check_names_the_first_zero_or_constant_gate_and_counts_them():
    refused = []

    def refuse(first: str, count: int) -> GaggleError:
        refused.append((first, count))
        return GaggleError("zero")

    gates = [("a", torch.tensor([0.5, -0.2, 0.1])), ("b", torch.zeros(3)),
             ("c", torch.tensor([0.0, -0.0, 0.0])), ("d", torch.ones(3) * 1e30),
             ("e", torch.tensor([0.0, 1e-30, 0.0])), ("f", torch.tensor([1.0, 1.01, 1.0]))]
    with pytest.raises(GaggleError, match="zero"):
        check_gates_trained(gates, refuse)
    # a constant gate, however large, and a gate that moved by 1e-30 are zero keys once
    # layer-normed
    assert refused == [("b", 4)]
    check_gates_trained([g for g in gates if g[0] in "af"], refuse)  # gates that vary pass
    assert refused == [("b", 4)]


def test_fingerprint_mismatch_is_its_own_error(saved, tiny_spec):
    path, _ = saved
    other = BaseSpec(name="other", fingerprint="0" * 64, linears=tiny_spec.linears)
    with pytest.raises(FingerprintMismatch, match="retrain it on --base other") as info:
        load_bundle(path, other)
    assert info.value.status == "FAILED_PRECONDITION"


def test_save_refuses_to_overwrite_and_leaves_no_temp(tiny_spec, tmp_path):
    bundle = random_bundle(tiny_spec, "x")
    save_bundle(bundle, tmp_path / "b")
    with pytest.raises(FileExistsError):
        save_bundle(bundle, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_save_of_invalid_bundle_leaves_nothing(tiny_spec, tmp_path):
    bundle = random_bundle(tiny_spec, "x")
    key = next(iter(bundle.gates))
    bundle.gates[key] = torch.full_like(bundle.gates[key], math.nan)
    with pytest.raises(GaggleError):
        save_bundle(bundle, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def unpack(archive: Path, dest: Path, *, max_bytes: int) -> Path:
    """Extract an archive the way the coordinator does: parse and hash it as it streams in,
    then copy out exactly the members that parse found."""
    digest = ArchiveDigest()
    digest.update(archive.read_bytes())
    return extract_members(archive, digest.members(max_bytes), dest)


def test_archive_round_trip_is_deterministic(saved, tmp_path):
    path, _ = saved
    blob = pack_bundle_bytes(path)
    assert blob == pack_bundle_bytes(path)
    (tmp_path / "a.tar").write_bytes(blob)
    out = unpack(tmp_path / "a.tar", tmp_path / "out", max_bytes=10 << 20)
    assert load_bundle(out).expert_id == load_bundle(path).expert_id


def test_archive_rejects_path_traversal_and_oversize(saved, tmp_path):
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "evil.tar").write_bytes(buffer.getvalue())
    with pytest.raises(InvalidBundle, match="only regular files named"):
        unpack(tmp_path / "evil.tar", tmp_path / "x", max_bytes=1 << 20)
    assert not (tmp_path / "x").exists()
    path, _ = saved
    (tmp_path / "ok.tar").write_bytes(pack_bundle_bytes(path))
    with pytest.raises(InvalidBundle, match="over the 100 limit"):
        unpack(tmp_path / "ok.tar", tmp_path / "y", max_bytes=100)
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_an_update_far_beyond_the_base_weight_is_refused_naming_the_module(tiny_spec, method):
    bundle = random_bundle(tiny_spec, "huge", method=method, seed=1)
    check_update_norms(bundle, tiny_spec)  # an ordinary expert passes
    key = next(k for k in sorted(bundle.adapter) if not k.endswith("lora_A"))
    module = key.rsplit(".", 1)[0]
    bundle.adapter[key] = torch.full_like(bundle.adapter[key], 1e10) * torch.tensor(
        [(-1) ** i for i in range(bundle.adapter[key].shape[-1])], dtype=torch.float32)
    with pytest.raises(InvalidBundle, match=f"update of module {module} is .* times the base"):
        check_update_norms(bundle, tiny_spec)
    check_update_norms(bundle, tiny_spec, max_ratio=0)  # the bound turned off
    unknown = BaseSpec(tiny_spec.name, tiny_spec.fingerprint, tiny_spec.linears)
    check_update_norms(bundle, unknown)  # no norms known: nothing to measure against


def test_a_tensor_header_entry_with_more_than_its_schema_is_refused(tiny_spec, tmp_path):
    folder = save_bundle(random_bundle(tiny_spec, "noted", seed=2), tmp_path / "b")
    path = folder / ADAPTER
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["note"] = "x" * 64_000
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    _rehash(folder)
    with pytest.raises(InvalidBundle, match="must hold exactly"):
        load_bundle(folder)
