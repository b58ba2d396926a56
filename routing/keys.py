"""An expert's key shard: everything a router needs of one expert except its adapter.

PHATGOOSE scores every token against every expert's key at every module, so a router must
hold all keys; a token's adapter compute touches only its top-k experts, so the adapters can
stay on disk and be paged in (routing.paging). The key shard is the part held in full. It is
derived once per expert from its bundle and addressed by the expert id, so every router
version that holds the expert reuses the same file.

A key shard is one safetensors file. Tensors, per adapted module (d_in,):

    "<module>:keys"          the PHATGOOSE gate vector
    "<module>:prototypes"    Arrow's prototype, the top right singular vector of B A (LoRA);
                             zero for (IA)^3, whose prototype needs the base weight (route())
    "<module>:activations"   the mean module input, when the bundle shipped it

Its header metadata ("gaggle_keys", JSON) holds the key format, the expert id, the LoRA rank
(0 for (IA)^3), the scaling and, per module, [name, kind, d_in, d_out]. The coordinator
writes these files; only JSON and safetensors are parsed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from protocol.bundle import Bundle, lora_rank, lora_scaling
from protocol.errors import FingerprintMismatch, InvalidArgument
from routing.paging import AdapterPool
from routing.stack import ModuleRouter, RouterWeights, arrow_prototype

KEYS_FORMAT = 1
KEY_FIELDS = ("keys", "prototypes", "activations")  # ModuleRouter's names for them
_METADATA = "gaggle_keys"


@dataclass(frozen=True)
class ModuleShape:
    """One adapted module of an expert: its kind and shape."""

    kind: str  # "lora", "ia3_out" or "ia3_in"
    d_in: int
    d_out: int


@dataclass
class ExpertKeys:
    """One expert's key shard, loaded (only the fields asked for)."""

    expert_id: str
    rank: int  # LoRA rank r; 0 for (IA)^3
    scaling: float  # s in dW = s * B A; 1.0 for (IA)^3
    modules: dict[str, ModuleShape]
    tensors: dict[str, torch.Tensor]  # "<module>:<field>" -> (d_in,) float32

    def get(self, module: str, field: str) -> torch.Tensor | None:
        return self.tensors.get(f"{module}:{field}")


def expert_keys(bundle: Bundle) -> ExpertKeys:
    """Derive the key shard of a loaded (validated) bundle."""
    manifest = bundle.manifest
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for spec in manifest.modules:
        modules[spec.name] = ModuleShape(spec.kind, spec.d_in, spec.d_out)
        tensors[f"{spec.name}:keys"] = bundle.gates[spec.name].float()
        if spec.kind == "lora":
            prototype = arrow_prototype(bundle.adapter[f"{spec.name}.lora_A"],
                                        bundle.adapter[f"{spec.name}.lora_B"])
        else:
            prototype = torch.zeros(spec.d_in)
        tensors[f"{spec.name}:prototypes"] = prototype.float()
        if bundle.activations is not None:
            tensors[f"{spec.name}:activations"] = bundle.activations[spec.name].float()
    return ExpertKeys(expert_id=bundle.expert_id, rank=lora_rank(manifest) or 0,
                      scaling=lora_scaling(manifest), modules=modules, tensors=tensors)


def key_shard_bytes(keys: ExpertKeys) -> bytes:
    """The key shard as safetensors bytes (tensors sorted by name, so the bytes are fixed)."""
    header = {"format": KEYS_FORMAT, "expert_id": keys.expert_id, "rank": keys.rank,
              "scaling": keys.scaling,
              "modules": [[name, m.kind, m.d_in, m.d_out] for name, m in keys.modules.items()]}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in sorted(keys.tensors.items())}
    return save_safetensors_bytes(tensors, metadata={_METADATA: json.dumps(header)})


def read_key_shard(path: str | os.PathLike,
                   fields: Sequence[str] = KEY_FIELDS) -> ExpertKeys:
    """Load the asked-for fields of a key shard file (InvalidArgument if it is not one)."""
    unknown = set(fields) - set(KEY_FIELDS)
    if unknown:
        raise InvalidArgument(f"key fields {sorted(unknown)} do not exist: use {KEY_FIELDS}",
                              field="fields")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})[_METADATA])
            if header.get("format") != KEYS_FORMAT:
                raise KeyError("format")
            wanted = [k for k in handle.keys() if k.rsplit(":", 1)[-1] in fields]
            tensors = {k: handle.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise InvalidArgument(f"{path} is not a gaggle key shard (format {KEYS_FORMAT}): "
                              f"{str(err)[:200]}; rebuild it from its bundle",
                              field="keys") from None
    modules = {name: ModuleShape(kind, int(d_in), int(d_out))
               for name, kind, d_in, d_out in header["modules"]}
    return ExpertKeys(expert_id=header["expert_id"], rank=int(header["rank"]),
                      scaling=float(header["scaling"]), modules=modules, tensors=tensors)


def write_key_shard(keys: ExpertKeys, path: str | os.PathLike) -> Path:
    """Write a key shard file (for folders outside a store; the coordinator goes through
    its object store)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(key_shard_bytes(keys))
    return target


def router_from_keys(names: Sequence[str], shards: Sequence[ExpertKeys], *, base_model: str,
                     fingerprint: str, adapters: AdapterPool | None) -> RouterWeights:
    """A router over experts given by their key shards (in collection order, named `names`):
    every module's keys stacked, the adapters left to `adapters` (routing.paging), which
    reads expert i's bundle for collection position i.

    The same layout as `routing.stack.stack_experts`, without the factors: rows are the
    experts adapting the module, in collection order; `paged_rank` is their largest rank.
    A field absent from a shard (not asked for, or no activations shipped) is None for every
    module it touches.
    """
    if len(names) != len(shards):
        raise InvalidArgument(f"{len(names)} names for {len(shards)} key shards",
                              field="experts")
    rows: dict[str, list[int]] = {}
    shapes: dict[str, ModuleShape] = {}
    for position, shard in enumerate(shards):
        for module, shape in shard.modules.items():
            known = shapes.setdefault(module, shape)
            if (known.d_in, known.d_out) != (shape.d_in, shape.d_out):
                raise FingerprintMismatch(
                    f"expert {names[position]!r} adapts {module} as ({shape.d_in} -> "
                    f"{shape.d_out}), another expert as ({known.d_in} -> {known.d_out}): "
                    "route only experts of one base", field="modules")
            rows.setdefault(module, []).append(position)
    modules = {}
    for module in sorted(rows):
        members = [shards[i] for i in rows[module]]
        stacked = {}
        for field in KEY_FIELDS:
            parts = [shard.get(module, field) for shard in members]
            stacked[field] = torch.stack(parts) if all(p is not None for p in parts) else None
        kinds = [shard.modules[module].kind for shard in members]
        modules[module] = ModuleRouter(
            name=module, d_in=shapes[module].d_in, d_out=shapes[module].d_out,
            experts=[names[i] for i in rows[module]], kinds=kinds,
            scaling=torch.tensor([shard.scaling for shard in members], dtype=torch.float32),
            paged_rank=max((s.rank for s, k in zip(members, kinds, strict=True)
                            if k == "lora"), default=0),
            **stacked)
    if adapters is not None:
        adapters.plan(list(modules.values()))
    return RouterWeights(base_model=base_model, fingerprint=fingerprint, experts=list(names),
                         modules=modules, adapters=adapters)
