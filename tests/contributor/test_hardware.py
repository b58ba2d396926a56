"""Training on a chosen dtype, module set and memory trade-off, and recycling adapters from
the local Hugging Face cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from contributor.targets import parse_target_modules
from contributor.train import TrainConfig, train_expert
from protocol.bundle import load_bundle
from protocol.errors import InvalidArgument
from tests.contributor.conftest import FAST, GATE_FAST


def test_bf16_base_trains_float32_expert_that_fits_the_float32_base(cli, tmp_path, data_file,
                                                                   tiny_spec, method):
    out = tmp_path / "expert"
    code, _, err = cli("train", "--base", "tiny-llama", "--data", data_file, "--out", out,
                       "--method", method, "--device", "cpu", "--dtype", "bfloat16", *FAST)
    assert code == 0, err
    bundle = load_bundle(out, tiny_spec)  # validates against the float32 load's fingerprint
    shipped = [*bundle.adapter.values(), *bundle.gates.values(), *bundle.activations.values()]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in shipped)
    assert all(gate.abs().sum() > 0 for gate in bundle.gates.values())
    assert bundle.manifest.training["bf16"] == 1


@pytest.mark.parametrize("targets, method, expected", [
    ("q_proj,v_proj", "lora", {"q_proj": "lora", "v_proj": "lora"}),
    (r".*layers\.1\.mlp\.\w+_proj", "lora", {"gate_proj": "lora", "up_proj": "lora",
                                       "down_proj": "lora"}),
    ("k_proj,down_proj", "ia3", {"k_proj": "ia3_out", "down_proj": "ia3_in"}),
])
def test_target_modules_choose_the_adapted_modules(cli, tmp_path, data_file, tiny_spec,
                                                   targets, method, expected):
    out = tmp_path / "expert"
    code, _, err = cli("train", "--base", "tiny-llama", "--data", data_file, "--out", out,
                       "--method", method, "--target-modules", targets, *FAST)
    assert code == 0, err
    modules = load_bundle(out, tiny_spec).manifest.modules
    assert {m.name.rsplit(".", 1)[-1]: m.kind for m in modules} == expected
    if targets.startswith(".*"):  # a regex over full names: only the second block
        assert all(".layers.1." in m.name for m in modules) and len(modules) == 3


@pytest.mark.parametrize("text, message", [
    ("q_proj,v-proj", "comma list holds plain module names"),
    ("q_proj[", "neither a comma list of module names nor a valid regex"),
])
def test_bad_target_modules_are_refused(text, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_target_modules(text)
    with pytest.raises(InvalidArgument, match=message):
        TrainConfig(target_modules=text)


def test_target_modules_matching_nothing_fail_in_one_line(cli, tmp_path, data_file):
    code, _, err = cli("train", "--base", "tiny-llama", "--data", data_file, "--out",
                       tmp_path / "e", "--target-modules", "no_such_proj", *FAST)
    assert code != 0 and "no_such_proj" in err and not (tmp_path / "e").exists()


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    from contributor.data import read_jsonl, tokenize
    from routing.base import load_base
    from tests.contributor.conftest import write_records

    write_records(tmp_path / "d.jsonl")
    base = load_base("tiny-llama")
    examples = tokenize(read_jsonl(tmp_path / "d.jsonl"), base.tokenizer, 32)
    runs, calls = [], []
    # a block's children start again in the backward pass when the block is checkpointed
    # (a pre-hook: torch stops the recompute once the last saved tensor is back)
    hook = base.model.model.layers[0].mlp.register_forward_pre_hook(
        lambda *_: calls.append(1))
    for enabled in (False, True):
        config = TrainConfig(steps=3, batch_size=4, precision="fp32",
                             gradient_checkpointing=enabled)
        calls.clear()
        expert, losses = train_expert(base, examples, config)
        runs.append((expert, losses, len(calls)))
        assert not any(m.training for m in base.model.modules())  # eval mode restored
        assert not base.model.is_gradient_checkpointing
    hook.remove()
    (plain, plain_losses, plain_calls), (checkpointed, checkpointed_losses, recomputed) = runs
    assert (plain_calls, recomputed) == (3, 6)
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    for key, tensor in plain.adapter.items():
        assert torch.allclose(checkpointed.adapter[key], tensor, atol=1e-6)


def _cache_adapter(cache, repo: str, rank: int, alpha: int, rslora: bool, targets: list[str]):
    """A peft LoRA adapter laid out as the Hugging Face cache holds a downloaded repo."""
    from peft import LoraConfig, get_peft_model

    from routing.base import load_base

    model = get_peft_model(load_base("tiny-llama").model, LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets))
    torch.manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    revision = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    model.save_pretrained(root / "snapshots" / revision)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    model.unload()


@pytest.mark.parametrize("rank, alpha, rslora, dtype", [(3, 7, False, "float32"),
                                                       (4, 6, True, "bfloat16")])
def test_gate_takes_a_hub_id_from_the_local_cache(cli, tmp_path, data_file, tiny_spec,
                                                  monkeypatch, rank, alpha, rslora, dtype):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_adapter(tmp_path / "hub", "someone/tiny-expert", rank, alpha, rslora,
                   ["k_proj", "o_proj", "up_proj"])
    out = tmp_path / "recycled"
    code, _, err = cli("gate", "--adapter", "someone/tiny-expert", "--base", "tiny-llama",
                       "--data", data_file, "--out", out, "--dtype", dtype, *GATE_FAST)
    assert code == 0, err
    bundle = load_bundle(out, tiny_spec)  # a bf16 load fits the float32 base spec
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in bundle.gates.values())
    manifest = bundle.manifest
    assert manifest.peft["rank"] == rank and len(manifest.modules) == 6
    expected = alpha / math.sqrt(rank) if rslora else alpha / rank
    assert manifest.peft["scaling"] == pytest.approx(expected)


def test_hub_id_not_in_the_cache_is_refused_without_downloading(cli, tmp_path, data_file,
                                                                monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    code, _, err = cli("gate", "--adapter", "someone/absent", "--base", "tiny-llama",
                       "--data", data_file, "--out", tmp_path / "out", *GATE_FAST)
    assert code != 0 and "nothing is downloaded" in err
    assert "someone/absent" in err and not (tmp_path / "out").exists()


def test_dora_adapter_in_the_cache_is_refused_naming_the_kind(cli, tmp_path, data_file,
                                                               monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_adapter(tmp_path / "hub", "someone/dora", 2, 4, False, ["q_proj"])
    (config_path,) = (tmp_path / "hub").glob("**/adapter_config.json")
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "use_dora": True}))
    code, _, err = cli("gate", "--adapter", "someone/dora", "--base", "tiny-llama",
                       "--data", data_file, "--out", tmp_path / "out", *GATE_FAST)
    assert code != 0 and "DoRA (use_dora) cannot be routed" in err


def test_quantized_ia3_is_refused_before_loading():
    with pytest.raises(InvalidArgument, match="--quantize 4bit trains LoRA experts only"):
        TrainConfig(method="ia3", quantize="4bit")


def test_ia3_on_a_family_without_peft_defaults_needs_target_modules(tmp_path):
    from contributor.data import Example, tokenize
    from routing.base import load_base
    from tests.routing.families import save_family

    base = load_base(str(save_family("phi3", tmp_path / "phi3")))
    examples = tokenize([Example(f"{i} plus 1 is", f" {i + 1}") for i in range(8)],
                        base.tokenizer, 16)
    with pytest.raises(InvalidArgument, match="no default \\(IA\\)\\^3 modules for model "
                                              "type 'phi3': name them with --target-modules"):
        train_expert(base, examples, TrainConfig(method="ia3", steps=1, batch_size=4))
    expert, _ = train_expert(base, examples, TrainConfig(
        method="ia3", steps=1, batch_size=4, target_modules="qkv_proj,down_proj"))
    kinds = {m.name.rsplit(".", 1)[-1]: m.kind for m in expert.modules}
    assert kinds == {"qkv_proj": "ia3_out", "down_proj": "ia3_in"}
