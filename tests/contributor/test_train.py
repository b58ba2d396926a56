"""`gaggle-contributor train` and `gate` end to end on the tiny model, and every bad input."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from contributor.train import TrainConfig
from protocol.bundle import ACTIVATIONS, load_bundle
from protocol.errors import InvalidArgument
from tests.contributor.conftest import FAST, GATE_FAST, write_records

MODULES = {"lora": 14, "ia3": 6}  # tiny-llama: 7 linears per block x 2; (IA)^3: k, v, down


def test_train_writes_a_bundle_that_validates(cli, tmp_path, data_file, tiny_spec, method):
    out = tmp_path / "expert"
    code, stdout, _ = cli("train", "--base", "tiny-llama", "--data", data_file, "--out", out,
                          "--method", method, *FAST)
    assert code == 0
    assert str(out) in stdout
    bundle = load_bundle(out, tiny_spec)
    manifest = bundle.manifest
    assert (manifest.name, manifest.method) == ("expert", method)
    assert len(manifest.modules) == MODULES[method]
    assert manifest.training["expert_steps"] == 3 and manifest.training["gate_steps"] == 3
    assert manifest.training["examples"] == 16
    assert all(isinstance(v, int | float) for v in manifest.training.values())
    assert bundle.activations is not None
    assert all(gate.abs().sum() > 0 for gate in bundle.gates.values())
    if method == "lora":
        assert manifest.peft["rank"] == TrainConfig.rank
        assert manifest.peft["scaling"] == pytest.approx(TrainConfig.alpha / TrainConfig.rank)
        # B starts at zero in peft; after training the expert is no longer the identity.
        assert any(t.abs().sum() > 0 for k, t in bundle.adapter.items() if k.endswith("lora_B"))
    else:
        assert any(not torch.all(t == 1.0) for t in bundle.adapter.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "expert"]


def test_no_activations_flag_leaves_the_file_out(cli, tmp_path, data_file, tiny_spec):
    out = tmp_path / "expert"
    code, _, _ = cli("train", "--base", "tiny-llama", "--data", data_file, "--out", out,
                     "--no-activations", *FAST)
    assert code == 0
    assert not (out / ACTIVATIONS).exists()
    assert load_bundle(out, tiny_spec).activations is None


def _saved_adapter(folder, method: str):
    """Save a peft adapter with random weights, trained on nothing, as a contributor might."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from routing.base import load_base

    base = load_base("tiny-llama")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]) \
        if method == "lora" else IA3Config()
    model = get_peft_model(base.model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param) + 0.05)
    model.save_pretrained(folder)
    return load_file(folder / "adapter_model.safetensors")


def test_gate_recycles_a_saved_peft_adapter(cli, tmp_path, data_file, tiny_spec, method):
    saved = _saved_adapter(tmp_path / "adapter", method)
    out = tmp_path / "recycled"
    code, _, _ = cli("gate", "--adapter", tmp_path / "adapter", "--base", "tiny-llama",
                     "--data", data_file, "--out", out, *GATE_FAST)
    assert code == 0
    bundle = load_bundle(out, tiny_spec)
    assert bundle.manifest.training["expert_steps"] == 0
    assert bundle.manifest.training["gate_steps"] == 3
    for key, tensor in saved.items():
        module = key.removeprefix("base_model.model.")
        if method == "lora":
            module, part = module.rsplit(".", 2)[0], module.rsplit(".", 2)[1]
            assert torch.equal(bundle.adapter[f"{module}.{part}"], tensor)
        else:
            module = module.removesuffix(".ia3_l")
            assert torch.equal(bundle.adapter[f"{module}.ia3"], tensor.flatten())
    if method == "lora":
        assert len(bundle.manifest.modules) == 4
        assert bundle.manifest.peft["scaling"] == pytest.approx(4 / 2)
    assert all(gate.abs().sum() > 0 for gate in bundle.gates.values())


def test_gate_retrains_the_gates_of_a_bundle_and_keeps_its_expert(cli, tmp_path, data_file,
                                                                  tiny_spec, method):
    first = tmp_path / "first"
    code, _, err = cli("train", "--base", "tiny-llama", "--data", data_file, "--out", first,
                       "--method", method, *FAST)
    assert code == 0, err
    again = tmp_path / "again"
    code, _, err = cli("gate", "--adapter", first, "--base", "tiny-llama", "--data", data_file,
                       "--out", again, *GATE_FAST, "--gate-steps", "6")
    assert code == 0, err
    old, new = load_bundle(first, tiny_spec), load_bundle(again, tiny_spec)
    assert new.manifest.training["expert_steps"] == 0
    assert new.manifest.training["gate_steps"] == 6
    assert new.manifest.peft == old.manifest.peft
    assert new.adapter.keys() == old.adapter.keys()
    assert all(torch.equal(new.adapter[key], old.adapter[key]) for key in old.adapter)
    assert new.gates.keys() == old.gates.keys()
    assert not all(torch.equal(new.gates[m], old.gates[m]) for m in old.gates)  # 6 steps, not 3


def _untrained_adapter(folder, method: str, zero: str = "") -> None:
    """Save a peft adapter straight from its initialisation (LoRA B = 0, (IA)^3 = 1.0), or
    with random factors except `zero` ("lora_A") set to zero."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from routing.base import load_base

    base = load_base("tiny-llama")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=not zero) if method == "lora" else IA3Config()
    model = get_peft_model(base.model, config)
    if zero:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if f".{zero}." in name:
                    param.zero_()
    model.save_pretrained(folder)


@pytest.mark.parametrize("method, zero, expected", [
    ("lora", "", "every lora_B is zero"),
    ("lora", "lora_A", "every lora_A is zero"),
    ("ia3", "", "every (IA)^3 vector is exactly 1.0"),
])
def test_gate_refuses_an_adapter_that_was_never_trained(cli, tmp_path, data_file, method, zero,
                                                        expected):
    adapter = tmp_path / "adapter"
    _untrained_adapter(adapter, method, zero)
    out = tmp_path / "out"
    code, _, err = cli("gate", "--adapter", adapter, "--base", "tiny-llama", "--data",
                       data_file, "--out", out, *GATE_FAST)
    _assert_clean_failure(code, err, f"adapter {adapter} has never been trained: {expected}, "
                          "so its delta and its gate gradient are zero; train it first",
                          tmp_path, out)  # one line: refused before any training bar


def test_gate_refuses_to_ship_a_gate_that_training_left_at_zero(cli, tmp_path, data_file):
    """One module of an otherwise trained adapter has a zero delta: its gate gets no
    gradient, and the command fails instead of writing a bundle the coordinator refuses."""
    adapter = tmp_path / "adapter"
    tensors = _saved_adapter(adapter, "lora")
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, adapter / "adapter_model.safetensors")
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    out = tmp_path / "out"
    code, _, err = cli("gate", "--adapter", adapter, "--base", "tiny-llama", "--data",
                       data_file, "--out", out, *GATE_FAST)
    assert code != 0
    last = err.splitlines()[-1]  # after the training progress bars
    assert last.startswith(f"error: gate training left the gate of module {module} all zero")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _misfit_adapter(folder):
    tensors = _saved_adapter(folder, "lora")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(2, 48)  # tiny-llama's hidden size is 32
    save_file(tensors, folder / "adapter_model.safetensors")


def _bin_only_adapter(folder):
    _saved_adapter(folder, "lora")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


BAD_DATA = {
    "missing file": (None, "does not exist"),
    "empty file": ("", "holds no records"),
    "malformed line": ('{"input": "a", "target": "b"}\n{"input": \n', "line 2: not valid JSON"),
    "no target": ('{"input": "a"}\n', "line 1: the record needs string field(s) ['target']"),
    "no input": ('{"target": "a"}\n', "line 1: the record needs string field(s) ['input']"),
}


def _assert_clean_failure(code: int, err: str, expected: str, tmp_path, out) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_fails_in_one_line_and_writes_nothing(cli, tmp_path, case):
    content, expected = BAD_DATA[case]
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = cli("train", "--base", "tiny-llama", "--data", data, "--out", out, *FAST)
    _assert_clean_failure(code, err, expected, tmp_path, out)


@pytest.mark.parametrize("make, expected", [
    (_misfit_adapter, "has shape (2, 48), but base model 'tiny-llama' needs (2, 32)"),
    (_bin_only_adapter, "only safetensors adapters are read"),
    (lambda folder: folder.mkdir(), "adapter_config.json is missing"),
])
def test_bad_adapter_fails_in_one_line_and_writes_nothing(cli, tmp_path, data_file, make,
                                                          expected):
    make(tmp_path / "adapter")
    out = tmp_path / "out"
    code, _, err = cli("gate", "--adapter", tmp_path / "adapter", "--base", "tiny-llama",
                       "--data", data_file, "--out", out, *GATE_FAST)
    _assert_clean_failure(code, err, expected, tmp_path, out)


def test_unknown_base_fails_in_one_line(cli, tmp_path, data_file):
    out = tmp_path / "out"
    code, _, err = cli("train", "--base", "no-such-model", "--data", data_file, "--out", out)
    _assert_clean_failure(code, err, "unknown base model 'no-such-model'", tmp_path, out)


def test_existing_out_is_refused_before_training(cli, tmp_path, data_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("train", "--base", "tiny-llama", "--data", data_file, "--out", out)
    assert code != 0 and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_diverging_training_leaves_nothing(cli, tmp_path, data_file):
    out = tmp_path / "out"
    code, _, err = cli("train", "--base", "tiny-llama", "--data", data_file, "--out", out,
                       *FAST, "--lr", "1e30")
    assert code != 0 and "lower the learning rate" in err.splitlines()[-1]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("setting, field", [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
                                            ({"gate_lr": float("nan")}, "gate-lr"),
                                            ({"max_length": 1}, "max-length"),
                                            ({"method": "dora"}, "method"),
                                            ({"precision": "fp16"}, "precision"),
                                            ({"schedule": "cosine"}, "schedule")])
def test_bad_settings_are_refused(setting, field):
    with pytest.raises(InvalidArgument) as info:
        TrainConfig(**setting)
    assert info.value.field == field


def test_lr_schedules_warm_up_then_hold_or_decay_to_zero():
    from contributor.train import lr_factor

    constant = [lr_factor(step, 50, 0.06, "constant") for step in range(50)]
    linear = [lr_factor(step, 50, 0.06, "linear") for step in range(50)]
    assert constant[:3] == linear[:3] == [1 / 3, 2 / 3, 1.0]  # 6% of 50 steps: 3 warmup steps
    assert constant[3:] == [1.0] * 47
    assert all(a > b > 0 for a, b in zip(linear[2:-1], linear[3:], strict=True))  # decreasing
    assert linear[-1] == pytest.approx(1 / 48)  # the next step would be at zero


def test_linear_schedule_runs_from_the_cli(cli, tmp_path, data_file):
    out = tmp_path / "expert"
    assert cli("train", "--base", "tiny-llama", "--data", data_file, "--out", out, *FAST,
               "--schedule", "linear")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["training"]["lr_decay"] == 1


def test_manifest_is_json_numbers_only_with_a_loss_curve_per_step(cli, tmp_path, data_file):
    out = tmp_path / "expert"
    before = time.time()
    assert cli("train", "--base", "tiny-llama", "--data", data_file, "--out", out, *FAST)[0] == 0
    training = json.loads((out / "manifest.json").read_text())["training"]
    curves = {k: v for k, v in training.items() if isinstance(v, list)}
    assert set(curves) == {"expert_loss_curve", "gate_loss_curve"}
    assert all(isinstance(v, int | float) for v in training.values() if not isinstance(v, list))
    assert len(curves["expert_loss_curve"]) == training["expert_steps"]
    assert len(curves["gate_loss_curve"]) == training["gate_steps"]
    assert curves["expert_loss_curve"][0] == pytest.approx(training["expert_loss_first"], 1e-4)
    assert before <= training["started_at"] <= training["finished_at"] <= time.time()


def test_loss_curve_is_subsampled_evenly_to_its_bound():
    from contributor.train import loss_curve

    assert loss_curve([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    curve = loss_curve([float(i) for i in range(2500)], points=1000)
    assert len(curve) <= 1000 and curve[:3] == [0.0, 3.0, 6.0]


def test_target_loss_matches_the_transformers_loss(tiny_base):
    from contributor.data import Example, collate, tokenize
    from contributor.train import target_loss

    examples = tokenize([Example("abc def", " ghi"), Example("x", " yz w"),
                         Example("a longer prompt", " t")], tiny_base.tokenizer, 32)
    batch = collate(examples, tiny_base.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(target_loss(tiny_base.model, batch),
                                   tiny_base.model(**batch).loss)


def test_threads_auto_uses_all_cores_or_one(monkeypatch):
    import os

    from contributor.train import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 0.0, 0.0))
        assert set_threads(0) == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert set_threads(0) == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_gates_freezes_base_and_expert(tmp_path, method, precision):
    from contributor.data import read_jsonl, tokenize
    from contributor.train import train_expert, train_gates
    from routing.base import load_base

    base = load_base("tiny-llama")
    config = TrainConfig(method=method, steps=2, gate_steps=3, batch_size=4, max_length=32,
                         precision=precision)
    write_records(tmp_path / "d.jsonl")
    examples = tokenize(read_jsonl(tmp_path / "d.jsonl"), base.tokenizer, config.max_length)
    expert, _ = train_expert(base, examples, config)
    base_before = {k: v.clone() for k, v in base.model.state_dict().items()}
    expert_before = {k: v.clone() for k, v in expert.adapter.items()}
    gates, activations, summary = train_gates(base, expert, examples, config)
    after = base.model.state_dict()
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in after)
    assert all(torch.equal(expert.adapter[k], expert_before[k]) for k in expert_before)
    assert gates.keys() == activations.keys() == {m.name for m in expert.modules}
    assert all(gate.abs().sum() > 0 for gate in gates.values())
    # bf16 autocast runs the matmuls only: what ships stays float32 and finite
    shipped = [*gates.values(), *activations.values(), *expert.adapter.values()]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in shipped)
    assert summary["gate_steps"] == 3 and summary["activation_tokens"] > 0
