"""The closed manifest schema: what it refuses, field by field, and the canonical bytes."""

from __future__ import annotations

import hashlib
import json

import pytest

from protocol.bundle import MANIFEST, save_bundle
from protocol.errors import InvalidBundle
from protocol.manifest import (
    MAX_CURVE_POINTS,
    Manifest,
    json_depth,
    parse_manifest,
    strict_json,
)
from routing.synthetic import random_bundle


@pytest.fixture
def manifest_json(tiny_spec) -> dict:
    return random_bundle(tiny_spec, "e1", rank=2, seed=1).manifest.to_json()


def _set(path: str, value):
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = value
    return edit


# field path -> (edit, words the refusal must contain)
REFUSALS = {
    "extra_top_level_key": (_set("note", "x"), "unknown"),
    "extra_base_model_key": (_set("base_model.note", "x"), "manifest.base_model"),
    "extra_peft_key": (_set("peft.note", "x" * 100_000), "manifest.peft"),
    "extra_module_key": (_set("modules.0.note", 1), "manifest.modules[0]"),
    "base_name_too_long": (_set("base_model.name", "m" * 257), "base_model.name"),
    "base_name_control_char": (_set("base_model.name", "a\x1b[2Jb"), "base_model.name"),
    "name_trailing_newline": (_set("name", "e1\n"), "manifest.name"),
    "fingerprint_trailing_newline": (lambda m: m["base_model"].update(
        fingerprint=m["base_model"]["fingerprint"] + "\n"), "base_model.fingerprint"),
    "rank_zero": (_set("peft.rank", 0), "peft.rank"),
    "rank_bool": (_set("peft.rank", True), "peft.rank"),
    "scaling_not_finite_in_float32": (_set("peft.scaling", 1e39), "peft.scaling"),
    "alpha_huge_int": (_set("peft.alpha", 2**200), "peft.alpha"),
    "target_module_text": (_set("peft.target_modules", ["q_proj", "a b"]), "target_modules"),
    "target_module_too_long": (_set("peft.target_modules", ["q" * 10_000]), "at most 256"),
    "format_version_float": (_set("format_version", 1.0), "format_version is 1.0"),
    "training_text_key": (_set("training.alice_has_diabetes", 1), "carries no text"),
    "training_string_value": (_set("training.expert_steps", "100"), "training.expert_steps"),
    "training_negative_count": (_set("training.examples", -1), "training.examples"),
    "training_flag_two": (_set("training.bf16", 2), "training.bf16"),
    "training_long_curve": (_set("training.expert_loss_curve",
                                 [1.0] * (MAX_CURVE_POINTS + 1)), "expert_loss_curve"),
    "training_curve_text": (_set("training.gate_loss_curve", [1.0, "x"]), "gate_loss_curve"),
    "module_dim_huge": (_set("modules.0.d_in", 2**40), "modules[0].d_in"),
    "file_unknown": (lambda m: m["files"].update({"notes.txt": "0" * 64}), "manifest.files"),
    "file_hash_upper": (lambda m: m["files"].update({"adapter.safetensors": "A" * 64}),
                        "files.adapter"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_schema_refuses_each_field_out_of_bounds(manifest_json, case):
    edit, words = REFUSALS[case]
    edit(manifest_json)
    with pytest.raises(InvalidBundle) as info:
        parse_manifest(json.dumps(manifest_json).encode())
    assert words in str(info.value) and len(str(info.value)) < 1024


def test_a_valid_manifest_with_every_training_figure_parses(manifest_json):
    manifest_json["training"] = {"examples": 16, "expert_steps": 3, "bf16": 1,
                                 "expert_loss_curve": [2.5, 2.0, 1.5], "started_at": 1.7e9,
                                 "finished_at": 1.7e9 + 60, "expert_loss_final": 1.5}
    assert parse_manifest(json.dumps(manifest_json).encode()).training["examples"] == 16


def test_duplicate_keys_nesting_and_nan_are_refused_before_parsing():
    assert json_depth('{"a": "[[[[", "b": [[1]]}') == 3  # brackets inside strings do not count
    assert json_depth('["a\\\\", [["x\\"]"]]]') == 3  # an escaped backslash, an escaped quote
    assert json_depth('[{"k": [1, {"z": []}]}]') == 5
    assert json_depth('[["never closed ]]]') == 2  # a string that never closes runs to the end
    assert json_depth('"' + '\\"' * 50_000) == 0  # one token, not a rescan from every quote
    with pytest.raises(ValueError, match="twice"):
        strict_json('{"a": 1, "a": 2}', max_depth=3)
    with pytest.raises(ValueError, match="levels deep"):
        strict_json("[" * 100_000 + "]" * 100_000, max_depth=3)
    with pytest.raises(ValueError, match="NaN"):
        strict_json('{"a": NaN}', max_depth=3)


def test_saved_manifest_is_the_canonical_bytes_its_expert_id_hashes(tmp_path, tiny_spec):
    bundle = random_bundle(tiny_spec, "e1", rank=2, seed=1)
    folder = save_bundle(bundle, tmp_path / "b")
    data = (folder / MANIFEST).read_bytes()
    assert hashlib.sha256(data).hexdigest() == bundle.expert_id
    assert Manifest.from_json(json.loads(data)).canonical_bytes() == data
