"""An exported router version: stacked RouterWeights as safetensors plus a JSON manifest.

Layout of a router folder (what a consumer loads without the coordinator)::

    router.json          format version, base model + fingerprint, experts, per-module
                         experts/kinds/shapes, the sha256 of router.safetensors, metadata
    router.safetensors   "<module>:<field>" for keys, prototypes, scaling and, when present,
                         activations, lora_A, lora_B, ia3_out, ia3_in (see ModuleRouter)

Only JSON and safetensors are parsed; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from protocol.bundle import sha256_file
from protocol.errors import InvalidArgument
from routing.stack import ModuleRouter, RouterWeights

ROUTER_FORMAT = 1
ROUTER_MANIFEST = "router.json"
ROUTER_TENSORS = "router.safetensors"
REQUIRED_FIELDS = ("keys", "prototypes", "scaling")
OPTIONAL_FIELDS = ("activations", "lora_A", "lora_B", "ia3_out", "ia3_in")


def save_router(weights: RouterWeights, folder: str | os.PathLike, *,
                metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write `weights` to `folder` atomically (staging folder, then one rename).

    metadata: JSON-serialisable extras stored in the manifest (e.g. version number).
    """
    target = Path(folder)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists: pass overwrite=True or choose "
                              "another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for name, module in sorted(weights.modules.items()):
        present = [f for f in REQUIRED_FIELDS + OPTIONAL_FIELDS
                   if getattr(module, f) is not None]
        for field in present:
            tensors[f"{name}:{field}"] = getattr(module, field).detach().float().contiguous()
        modules.append({"name": name, "d_in": module.d_in, "d_out": module.d_out,
                        "experts": module.experts, "kinds": module.kinds,
                        "rank": module.rank, "fields": present})
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(tensors, staging / ROUTER_TENSORS)
        manifest = {"format_version": ROUTER_FORMAT, "base_model": weights.base_model,
                    "fingerprint": weights.fingerprint, "experts": weights.experts,
                    "modules": modules, "metadata": metadata or {},
                    "files": {ROUTER_TENSORS: sha256_file(staging / ROUTER_TENSORS)}}
        (staging / ROUTER_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n",
                                               encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_router_manifest(folder: str | os.PathLike) -> dict:
    """The decoded router.json of a router folder (cheap: no tensors are read)."""
    path = Path(folder) / ROUTER_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArgument(f"{folder} is not a router folder: {ROUTER_MANIFEST} is missing",
                              field="router") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"{path} is not valid JSON: {err}", field="router") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != ROUTER_FORMAT:
        raise InvalidArgument(f"{path}: format_version must be {ROUTER_FORMAT}",
                              field="router")
    return manifest


def load_router(folder: str | os.PathLike) -> RouterWeights:
    """Read a router folder written by `save_router`, checking its hash and every shape."""
    root = Path(folder)
    manifest = read_router_manifest(root)
    path = root / ROUTER_TENSORS
    expected = manifest.get("files", {}).get(ROUTER_TENSORS)
    if not path.exists() or sha256_file(path) != expected:
        raise InvalidArgument(f"{path} is missing or does not match the sha256 in "
                              f"{ROUTER_MANIFEST}: re-export the router", field="router")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise InvalidArgument(f"{path} is not a valid safetensors file: {err}",
                              field="router") from None
    try:
        modules = {entry["name"]: _module_from(entry, tensors)
                   for entry in manifest["modules"]}
        unknown = {e for m in modules.values() for e in m.experts} - set(manifest["experts"])
        if unknown:
            raise InvalidArgument(f"router modules name experts {sorted(unknown)[:5]} that "
                                  f"{ROUTER_MANIFEST} does not list", field="router")
        return RouterWeights(base_model=manifest["base_model"],
                             fingerprint=manifest["fingerprint"],
                             experts=list(manifest["experts"]), modules=modules)
    except (KeyError, TypeError) as err:
        raise InvalidArgument(f"{root}/{ROUTER_MANIFEST} lacks or misstates {err}",
                              field="router") from None


def _module_from(entry: dict, tensors: dict[str, torch.Tensor]) -> ModuleRouter:
    name, d_in, d_out = entry["name"], int(entry["d_in"]), int(entry["d_out"])
    count, rank = len(entry["experts"]), int(entry["rank"])
    shapes = {"keys": (count, d_in), "prototypes": (count, d_in), "scaling": (count,),
              "activations": (count, d_in), "lora_A": (count, rank, d_in),
              "lora_B": (count, d_out, rank), "ia3_out": (count, d_out),
              "ia3_in": (count, d_in)}
    fields = {}
    for field in entry["fields"]:
        tensor = tensors.get(f"{name}:{field}")
        if field not in shapes or tensor is None or tuple(tensor.shape) != shapes[field]:
            got = None if tensor is None else tuple(tensor.shape)
            raise InvalidArgument(f"router tensor {name}:{field} is {got}, expected "
                                  f"{shapes.get(field)}", field="router")
        if field == "lora_B":  # keep it as a view of (E, r, d_out): what routed layers read
            tensor = tensor.transpose(1, 2).contiguous().transpose(1, 2)
        fields[field] = tensor
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing or len(entry["kinds"]) != count:
        raise InvalidArgument(f"router module {name} lacks {missing} or has "
                              f"{len(entry['kinds'])} kinds for {count} experts",
                              field="router")
    return ModuleRouter(name=name, d_in=d_in, d_out=d_out, experts=list(entry["experts"]),
                        kinds=list(entry["kinds"]), **fields)


