"""Turning a peft expert (a live model or a saved adapter folder) into a protocol Bundle.

peft names tensors after its wrapper ("base_model.model.<module>.lora_A.weight"); a bundle
names them after the base model's own module paths ("<module>.lora_A"). Saved adapters are
read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from protocol.bundle import (
    MANIFEST,
    TENSOR_DTYPE,
    BaseSpec,
    Bundle,
    Manifest,
    ModuleSpec,
    load_bundle,
)
from protocol.errors import InvalidArgument
from routing.base import BaseModel

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Expert:
    """An expert's tensors in bundle naming, with its method and manifest peft settings.

    adapter: "<module>.lora_A" (r, d_in), "<module>.lora_B" (d_out, r) or "<module>.ia3"
    ((d_out,) for ia3_out, (d_in,) for ia3_in), float32 on CPU.
    """

    method: str
    peft: dict
    modules: list[ModuleSpec]
    adapter: dict[str, torch.Tensor]

    @property
    def scaling(self) -> float:
        """s in dW = s * B A for LoRA; 1.0 for (IA)^3, whose delta has no extra scale."""
        return float(self.peft["scaling"]) if self.method == "lora" else 1.0


def _suffixes(names: list[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def _lora_settings(rank: int, alpha: float, scaling: float, modules: list[str]) -> dict:
    return {"rank": rank, "alpha": float(alpha), "scaling": float(scaling),
            "target_modules": _suffixes(modules)}


def _ia3_settings(modules: list[ModuleSpec]) -> dict:
    return {"target_modules": _suffixes([m.name for m in modules]),
            "feedforward_modules": _suffixes([m.name for m in modules if m.kind == "ia3_in"])}


def _cpu32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", TENSOR_DTYPE).clone()


def expert_from_peft(peft_model: nn.Module) -> Expert:
    """Read the active adapter's tensors out of a live peft model (LoRA or (IA)^3)."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    adapter_name = peft_model.active_adapter
    config = peft_model.peft_config[adapter_name]
    # Per-module ranks and alphas get their own message below, from the layers themselves.
    unsupported = _unroutable(config, ("use_dora", "fan_in_fan_out", "lora_bias"))
    if unsupported:
        raise InvalidArgument(f"{', '.join(unsupported)} cannot be routed: train a plain "
                              "LoRA or (IA)^3 adapter", field="adapter")
    model = peft_model.get_base_model()
    modules: list[ModuleSpec] = []
    adapter: dict[str, torch.Tensor] = {}
    lora: dict[str, tuple[int, float, float]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
            a = layer.lora_A[adapter_name].weight
            b = layer.lora_B[adapter_name].weight
            adapter[f"{name}.lora_A"], adapter[f"{name}.lora_B"] = _cpu32(a), _cpu32(b)
            lora[name] = (a.shape[0], float(layer.lora_alpha[adapter_name]),
                          float(layer.scaling[adapter_name]))
            modules.append(ModuleSpec(name, "lora", layer.in_features, layer.out_features))
        elif isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l:
            kind = "ia3_in" if layer.is_feedforward else "ia3_out"
            adapter[f"{name}.ia3"] = _cpu32(layer.ia3_l[adapter_name].flatten())
            modules.append(ModuleSpec(name, kind, layer.in_features, layer.out_features))
    if not modules:
        raise InvalidArgument("the peft model has no LoRA or (IA)^3 layers for its active "
                              f"adapter {adapter_name!r}", field="adapter")
    if not lora:
        return Expert("ia3", _ia3_settings(modules), modules, adapter)
    settings = set(lora.values())
    if len(settings) != 1:
        raise InvalidArgument("the adapter uses different ranks or alphas per module; a bundle "
                              "holds one rank and one scaling: drop rank_pattern/alpha_pattern",
                              field="adapter")
    rank, alpha, scaling = settings.pop()
    return Expert("lora", _lora_settings(rank, alpha, scaling, list(lora)), modules, adapter)


def bundle_from_expert(expert: Expert, base: BaseModel | BaseSpec, name: str, *,
                       gates: dict[str, torch.Tensor] | None = None,
                       activations: dict[str, torch.Tensor] | None = None,
                       training: dict | None = None) -> Bundle:
    """Package an expert with its gates (default: zero vectors, the gate's initial state).

    Zero gates are for routing tests only: bundle validation refuses them, since a zero gate
    was never trained.
    """
    if gates is None:
        gates = {m.name: torch.zeros(m.d_in, dtype=TENSOR_DTYPE) for m in expert.modules}
    manifest = Manifest(
        name=name, base_model=base.name, base_fingerprint=base.fingerprint,
        method=expert.method, peft=dict(expert.peft), modules=list(expert.modules),
        training=dict(training or {}),
    )
    return Bundle(
        manifest=manifest,
        adapter={k: _cpu32(v) for k, v in expert.adapter.items()},
        gates={k: _cpu32(v) for k, v in gates.items()},
        activations=None if activations is None else
        {k: _cpu32(v) for k, v in activations.items()},
    )


def bundle_from_peft(peft_model: nn.Module, base: BaseModel | BaseSpec, name: str,
                     gates: dict[str, torch.Tensor] | None = None,
                     activations: dict[str, torch.Tensor] | None = None,
                     training: dict | None = None) -> Bundle:
    """A Bundle holding a live peft model's active adapter (LoRA or (IA)^3).

    gates / activations: module name -> (d_in,) tensors; gates default to zeros.
    """
    return bundle_from_expert(expert_from_peft(peft_model), base, name, gates=gates,
                              activations=activations, training=training)


def load_expert(folder: str | Path, base: BaseModel) -> Expert:
    """The expert to recycle: a saved peft adapter, or the expert of a gaggle bundle.

    A bundle's gates and mean activations are dropped, so its gate can be trained again, e.g.
    with other settings. Raises InvalidBundle or FingerprintMismatch for a bundle that does
    not validate against `base`, and load_peft_adapter's errors otherwise.
    """
    root = _adapter_folder(folder)
    if not (root / MANIFEST).is_file():
        return load_peft_adapter(root, base)
    bundle = load_bundle(root, base.spec())
    manifest = bundle.manifest
    return Expert(method=manifest.method, peft=dict(manifest.peft),
                  modules=list(manifest.modules), adapter=dict(bundle.adapter))


def _adapter_folder(source: str | Path) -> Path:
    """A local folder, or the cached snapshot of a Hugging Face hub id (never downloaded)."""
    root = Path(source)
    if root.exists() or len(str(source).split("/")) != 2:
        return root
    from routing.base import hub_snapshot

    cached = hub_snapshot(str(source))
    if cached is None:
        raise InvalidArgument(
            f"adapter {source!r} is neither a local folder nor a Hugging Face id in the local "
            "cache; nothing is downloaded: fetch it first (huggingface-cli download "
            f"{source}) or pass its folder", field="adapter")
    return cached


# peft options whose delta is not s * B A on a plain nn.Linear, by the name of the kind
_UNROUTABLE = {"use_dora": "DoRA (use_dora)", "use_qalora": "QA-LoRA (use_qalora)",
               "lora_bias": "LoRA with a trained bias (lora_bias)",
               "fan_in_fan_out": "a Conv1D (fan_in_fan_out) adapter",
               "rank_pattern": "per-module ranks (rank_pattern)",
               "alpha_pattern": "per-module alphas (alpha_pattern)",
               "modules_to_save": "fully trained modules (modules_to_save)",
               "layer_replication": "layer replication (layer_replication)"}


def _unroutable(config: object, keys: Collection[str] = tuple(_UNROUTABLE)) -> list[str]:
    """The kinds in _UNROUTABLE, among `keys`, that a peft config asks for: a live peft
    config object or the dict of adapter_config.json."""
    values = config if isinstance(config, dict) else \
        {key: getattr(config, key, None) for key in _UNROUTABLE}
    return [name for key, name in _UNROUTABLE.items() if key in keys and values.get(key)]


def load_peft_adapter(folder: str | Path, base: BaseModel | BaseSpec) -> Expert:
    """Read a saved peft adapter (adapter_config.json + adapter_model.safetensors).

    Raises InvalidArgument when files are missing, the adapter type or options are not
    supported, or a tensor's shape does not fit the base model's layer.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(folder)
    config = _read_adapter_config(root)
    weights = root / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise InvalidArgument(
            f"adapter folder {root} has no {ADAPTER_WEIGHTS}: only safetensors adapters are "
            "read (re-save with save_pretrained(..., safe_serialization=True))", field="adapter")
    try:
        tensors = load_file(weights)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise InvalidArgument(f"{weights} is not a valid safetensors file: {err}",
                              field="adapter") from None
    spec = base.spec() if isinstance(base, BaseModel) else base
    by_module = _group_by_module(tensors, config["peft_type"], root)
    for module in by_module:
        _base_shape(spec, module)
    # The base model's own module order, as a live peft model would list them.
    order = {name: index for index, name in enumerate(spec.linears)}
    by_module = dict(sorted(by_module.items(), key=lambda item: order[item[0]]))
    if config["peft_type"] == "LORA":
        return _lora_from_saved(config, by_module, spec)
    return _ia3_from_saved(config, by_module, spec)


def check_trained(expert: Expert, source: str | Path) -> None:
    """Refuse an adapter whose delta is exactly zero in every module.

    peft initialises LoRA's B (or, with some options, A) to zero and (IA)^3 vectors to 1.0,
    so a freshly initialised adapter changes nothing. Its gate then gets zero gradient and
    stays zero, which the coordinator refuses; catching it here saves the gate training.
    """
    untouched = _untrained_parts(expert)
    if untouched:
        raise InvalidArgument(
            f"adapter {source} has never been trained: {untouched}, so its delta and its "
            "gate gradient are zero; train it first", field="adapter")


def _untrained_parts(expert: Expert) -> str | None:
    """Which parts leave every module's delta at zero, in words; None when some module acts."""
    names = [m.name for m in expert.modules]
    if expert.method == "ia3":
        if all(bool((expert.adapter[f"{n}.ia3"] == 1.0).all()) for n in names):
            return "every (IA)^3 vector is exactly 1.0"
        return None
    for part in ("lora_B", "lora_A"):
        if not any(bool(expert.adapter[f"{n}.{part}"].any()) for n in names):
            return f"every {part} is zero"
    return None


def _read_adapter_config(root: Path) -> dict:
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        raise InvalidArgument(f"{root} is not a peft adapter folder: {ADAPTER_CONFIG} is "
                              "missing", field="adapter")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"{path} is not valid JSON: {err}", field="adapter") from None
    if not isinstance(config, dict) or config.get("peft_type") not in ("LORA", "IA3"):
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise InvalidArgument(f"{path}: a {kind!r} adapter cannot be routed; gaggle recycles "
                              "LORA and IA3 adapters", field="adapter")
    kinds = _unroutable(config)
    if config.get("bias", "none") != "none":
        kinds.append(f"trained biases (bias={config['bias']!r})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva")):
        kinds.append(f"{init} initialisation, which changes the base weights")
    if kinds:
        raise InvalidArgument(f"{path}: {', '.join(kinds)} cannot be routed: a bundle holds "
                              "plain LoRA factors (any rank, alpha, rsLoRA scaling, target set) "
                              "or (IA)^3 vectors only", field="adapter")
    return config


_SAVED_KEY = {"LORA": re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$"),
              "IA3": re.compile(r"^(?P<module>.+)\.(?P<part>ia3_l)$")}


def _group_by_module(tensors: dict[str, torch.Tensor], peft_type: str,
                     root: Path) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _SAVED_KEY[peft_type].match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise InvalidArgument(f"{root / ADAPTER_WEIGHTS}: unexpected tensor {key!r} for a "
                                  f"{peft_type} adapter", field="adapter")
        grouped.setdefault(match["module"], {})[match["part"]] = tensor
    if not grouped:
        raise InvalidArgument(f"{root / ADAPTER_WEIGHTS} holds no adapter tensors",
                              field="adapter")
    return grouped


def _base_shape(spec: BaseSpec, module: str) -> tuple[int, int]:
    shape = spec.linears.get(module)
    if shape is None:
        raise InvalidArgument(f"the adapter adapts {module!r}, which is not a linear layer of "
                              f"base model {spec.name!r}: it was trained for another base",
                              field="adapter")
    return shape


def _misfit(module: str, got: tuple, expected: tuple, spec: BaseSpec) -> InvalidArgument:
    return InvalidArgument(
        f"adapter tensor for {module} has shape {got}, but base model {spec.name!r} needs "
        f"{expected}: the adapter was trained for another base model", field="adapter")


def _lora_from_saved(config: dict, by_module: dict, spec: BaseSpec) -> Expert:
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise InvalidArgument(f"adapter_config.json: r={rank!r}, lora_alpha={alpha!r} must be "
                              "a positive integer and a number", field="adapter")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    modules, adapter = [], {}
    for module, parts in by_module.items():
        d_in, d_out = _base_shape(spec, module)
        if set(parts) != {"lora_A", "lora_B"}:
            raise InvalidArgument(f"adapter module {module} needs both lora_A and lora_B",
                                  field="adapter")
        for part, expected in (("lora_A", (rank, d_in)), ("lora_B", (d_out, rank))):
            if tuple(parts[part].shape) != expected:
                raise _misfit(f"{module}.{part}", tuple(parts[part].shape), expected, spec)
            adapter[f"{module}.{part}"] = _cpu32(parts[part])
        modules.append(ModuleSpec(module, "lora", d_in, d_out))
    return Expert("lora", _lora_settings(rank, alpha, scaling, list(by_module)), modules,
                  adapter)


def _ia3_from_saved(config: dict, by_module: dict, spec: BaseSpec) -> Expert:
    modules, adapter = [], {}
    for module, parts in by_module.items():
        d_in, d_out = _base_shape(spec, module)
        vector = parts["ia3_l"]
        feedforward = _matches(module, config.get("feedforward_modules"))
        expected = (1, d_in) if feedforward else (d_out, 1)
        if tuple(vector.shape) != expected:
            raise _misfit(f"{module}.ia3_l", tuple(vector.shape), expected, spec)
        adapter[f"{module}.ia3"] = _cpu32(vector.flatten())
        modules.append(ModuleSpec(module, "ia3_in" if feedforward else "ia3_out", d_in, d_out))
    return Expert("ia3", _ia3_settings(modules), modules, adapter)


def _matches(module: str, targets: object) -> bool:
    """peft's target matching: a regex string matches the full name; a list matches suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if isinstance(targets, list):
        return any(module == t or module.endswith(f".{t}") for t in targets)
    return False
