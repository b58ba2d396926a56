"""`gaggle-contributor inspect`: shows a bundle and says whether it validates."""

from __future__ import annotations

from protocol.bundle import save_bundle
from routing.synthetic import random_bundle


def test_inspect_shows_a_valid_bundle(cli, tmp_path, tiny_spec):
    path = save_bundle(random_bundle(tiny_spec, "shown", with_activations=True), tmp_path / "b")
    code, out, _ = cli("inspect", path, "--base", "tiny-llama")
    assert code == 0
    assert "name:           shown" in out
    assert "model.layers.1.mlp.down_proj" in out
    assert "adapter.safetensors" in out
    assert "validates: yes against base model 'tiny-llama'" in out


def test_inspect_reports_a_corrupted_bundle(cli, tmp_path, tiny_spec):
    path = save_bundle(random_bundle(tiny_spec, "broken"), tmp_path / "b")
    gates = path / "gates.safetensors"
    gates.write_bytes(gates.read_bytes()[:-4] + b"\0\0\0\0")
    code, out, _ = cli("inspect", path)
    assert code == 1
    assert "name:           broken" in out  # the manifest is still shown
    assert "validates: NO: gates.safetensors: sha256 does not match" in out
