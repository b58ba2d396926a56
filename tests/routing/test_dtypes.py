"""Base models in float32 and bf16: one fingerprint, the requested dtype, routing that keeps the
base's dtype with float32 scores, and the choices refused when unknown or absent."""

from __future__ import annotations

import json

import pytest
import torch

from protocol.errors import InvalidArgument
from routing.base import checkpoint_fingerprint, fingerprint, load_base
from routing.device import resolve, resolve_device
from routing.layers import RoutedLinear
from routing.router import route, unroute
from routing.synthetic import random_bundle
from tests.routing.families import FAMILIES, save_family


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_family(family, root / family) for family in (*FAMILIES, "gpt2")}


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_agrees_between_float32_and_bf16_loads(folders, family):
    full = load_base(str(folders[family]), dtype="float32")
    half = load_base(str(folders[family]), dtype="bfloat16")
    assert next(full.model.parameters()).dtype == torch.float32
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert full.fingerprint == half.fingerprint
    # and it is the checkpoint's identity: another seed is another base
    other = save_family(family, folders[family].parent / f"{family}-seed1", seed=1)
    assert load_base(str(other), dtype="bfloat16").fingerprint != full.fingerprint


def test_tiny_llama_fingerprint_is_taken_before_the_cast():
    full, half = load_base("tiny-llama"), load_base("tiny-llama", dtype="bfloat16")
    assert full.fingerprint == half.fingerprint == fingerprint(full.model)
    assert fingerprint(half.model) != full.fingerprint  # bf16 values are other values


def test_checkpoint_fingerprint_is_cached_and_keyed_on_the_files(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["qwen2"], tmp_path / "copy")
    value = checkpoint_fingerprint(folder)
    cache = json.loads((folder / "gaggle-fingerprint.json").read_text())
    assert cache["fingerprint"] == value
    # a stale cache entry (other key) is recomputed, never trusted
    (folder / "gaggle-fingerprint.json").write_text(json.dumps({"key": "x", "fingerprint": "0"}))
    assert checkpoint_fingerprint(folder) == value


def test_gpt2_conv1d_is_refused_naming_the_layer_type(folders):
    with pytest.raises(InvalidArgument, match=r"transformer\.h\.0\.attn\.c_attn is a "
                                              r"transformers\.pytorch_utils\.Conv1D"):
        load_base(str(folders["gpt2"]))


@pytest.mark.parametrize("device, dtype, message", [
    ("tpu", "auto", "--device must be one of"),
    ("cpu", "int8", "--dtype must be one of"),
    ("cuda:7", "auto", "CUDA device"),
])
def test_unknown_or_absent_placements_are_refused(device, dtype, message):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    with pytest.raises(InvalidArgument, match=message):
        load_base("tiny-llama", device=device, dtype=dtype)


def test_auto_is_float32_on_a_cpu_only_machine():
    placement = resolve("auto", "auto")
    if torch.cuda.is_available():
        assert placement.device.type == "cuda"
    elif placement.device.type == "cpu":
        assert placement.dtype == torch.float32
    assert resolve_device("cpu") == torch.device("cpu")


def test_quantize_without_bitsandbytes_or_cuda_is_refused():
    import importlib.util

    missing = importlib.util.find_spec("bitsandbytes") is None
    with pytest.raises(InvalidArgument, match="bitsandbytes" if missing else "CUDA GPU only"):
        load_base("tiny-llama", device="cpu", quantize="4bit")


@pytest.mark.parametrize("method", ["phatgoose", "arrow", "smear", "uniform_merge"])
def test_routing_a_bf16_base_keeps_bf16_and_scores_in_float32(method):
    full, half = load_base("tiny-llama"), load_base("tiny-llama", dtype="bfloat16")
    spec = full.spec()
    bundles = [random_bundle(spec, f"e{i}", method=kind, seed=i)
               for i, kind in enumerate(("lora", "ia3", "lora"))]
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        route(full, bundles, method=method, top_k=2)
        expected = full.model(ids).logits
        route(half, bundles, method=method, top_k=2)  # the float32 experts' fingerprint fits
        got = half.model(ids).logits
        generated = half.model.generate(ids, max_new_tokens=3, min_new_tokens=3,
                                        do_sample=False, pad_token_id=0)
    layers = [m for m in half.model.modules() if isinstance(m, RoutedLinear)]
    assert layers and got.dtype == torch.bfloat16 and generated.shape[1] == 9
    for layer in layers:
        assert layer.route_keys.dtype == torch.float32
        if layer.lora_A is not None:
            assert layer.lora_A.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected, atol=0.1, rtol=0.05)
    unroute(full.model)
    unroute(half.model)


def test_routing_a_base_with_packed_integer_weights_is_refused_untouched():
    from torch import nn

    base = load_base("tiny-llama")
    name = "model.layers.0.self_attn.q_proj"
    layer = base.model.get_submodule(name)
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8),
                                requires_grad=False)  # as a 4-bit base stores its weights
    with pytest.raises(InvalidArgument, match=f"module {name} holds torch.int8 weights"):
        route(base, [random_bundle(base.spec(), "e", seed=1)])
    assert not any(isinstance(m, RoutedLinear) for m in base.model.modules())


def test_a_base_in_the_local_hub_cache_loads_by_id_without_downloading(folders, tmp_path,
                                                                       monkeypatch):
    import shutil

    from huggingface_hub import constants

    revision = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--someone--tiny-mistral"
    shutil.copytree(folders["mistral"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = load_base("someone/tiny-mistral", dtype="bfloat16")
    assert cached.fingerprint == load_base(str(folders["mistral"])).fingerprint
    with pytest.raises(InvalidArgument, match="already in the local cache"):
        load_base("someone/not-cached")


def test_a_random_base_has_the_checkpoints_shape_and_a_seeded_identity(tmp_path):
    from routing.base import linear_shapes, random_base

    tiny = load_base("tiny-llama")
    tiny.model.config.save_pretrained(tmp_path)  # what the GPU check carries: no weights
    tiny.tokenizer.save_pretrained(tmp_path)
    first = random_base(tmp_path, dtype="bfloat16")
    assert first.model.dtype == torch.bfloat16 and first.name == f"random:{tmp_path.name}"
    assert linear_shapes(first.model) == linear_shapes(tiny.model)
    assert first.tokenizer("a b").input_ids == tiny.tokenizer("a b").input_ids
    assert first.fingerprint == tiny.fingerprint  # tiny-llama is this config drawn with seed 0
    assert random_base(tmp_path, seed=1).fingerprint != first.fingerprint
