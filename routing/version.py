"""Router versions on disk, in two formats.

A version by reference (what the coordinator writes and exports; format 2)::

    version.json                      the VersionManifest: experts by id, base, parent, diff
    keys/<expert_id>/keys.safetensors each expert's key shard (routing.keys), held in full
    experts/<expert_id>/              each expert's bundle (protocol.bundle), paged in on
                                      demand (routing.paging)

`open_router` reads one from wherever its key shards and bundles live (a folder like the above,
the coordinator's store, MLflow's artifact store); nothing of an expert is copied per version.

A stacked router (format 1, what versions held before; still read, for old stores and for
models logged to MLflow before versions went by reference)::

    router.json          format version, base model + fingerprint, experts, per-module
                         experts/kinds/shapes, the sha256 of router.safetensors, metadata
    router.safetensors   "<module>:<field>" for keys, prototypes, scaling and, when present,
                         activations, lora_A, lora_B, ia3_out, ia3_in (see ModuleRouter)

Only JSON and safetensors are parsed; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from protocol.bundle import Bundle, save_bundle, sha256_file
from protocol.errors import InvalidArgument
from routing.keys import expert_keys, read_key_shard, router_from_keys, write_key_shard
from routing.paging import DEFAULT_MAX_BYTES, AdapterFiles, AdapterPool
from routing.stack import ModuleRouter, RouterWeights

ROUTER_FORMAT = 1
VERSION_FORMAT = 2  # by reference; a format-1 version.json sits beside a stacked router/
VERSION_FILE = "version.json"
KEYS_DIR, KEY_FILE = "keys", "keys.safetensors"
EXPERTS_DIR = "experts"
STACKED_DIR = "router"  # a format-1 version's stacked router folder
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


def load_stacked(folder: str | os.PathLike) -> RouterWeights:
    """Read a stacked router folder written by `save_router`, checking its hash and every
    shape: every expert's tensors in memory."""
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




@dataclass(frozen=True)
class ExpertRef:
    """One expert of a version, by reference."""

    expert_id: str  # content id of its bundle (and of its key shard)
    name: str  # the key the router knows it by (the coordinator's contributor/name)
    contributor: str = ""
    method: str = ""  # "lora" or "ia3"

    def to_json(self) -> dict:
        return {"expert_id": self.expert_id, "name": self.name, "contributor": self.contributor,
                "method": self.method}


@dataclass(frozen=True)
class VersionManifest:
    """A router version's version.json: the one place it is written and read."""

    version_id: str
    base_model: str  # the coordinator's name for the base, which consumers load
    fingerprint: str  # the base's weight fingerprint
    experts: tuple[ExpertRef, ...]
    created_at: str = ""  # ISO 8601, UTC
    created_at_unix: float = 0.0
    parent: str | None = None  # the version current when this one was assembled
    diff: str = ""  # one line: +added ~changed -removed expert names
    modules: int = 0  # adapted modules routed
    format: int = VERSION_FORMAT  # 1: the version holds a stacked router/ folder
    extra: dict = dataclasses.field(default_factory=dict)  # unknown keys, kept as they are

    @property
    def expert_ids(self) -> list[str]:
        return [e.expert_id for e in self.experts]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def to_json(self) -> dict:
        return {**self.extra, "format": self.format, "version_id": self.version_id,
                "created_at": self.created_at, "created_at_unix": self.created_at_unix,
                "parent": self.parent, "diff": self.diff, "modules": self.modules,
                "base": {"name": self.base_model, "fingerprint": self.fingerprint},
                "experts": [e.to_json() for e in self.experts]}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: dict, source: str = "version.json") -> VersionManifest:
        """Read format 1 or 2; InvalidArgument naming `source` for anything else."""
        try:
            if data.get("format", 1) not in (1, VERSION_FORMAT):
                raise ValueError(f"format {data.get('format')!r}")
            known = {"format", "version_id", "created_at", "created_at_unix", "parent", "diff",
                     "modules", "base", "experts"}
            return cls(
                version_id=str(data["version_id"]), base_model=str(data["base"]["name"]),
                fingerprint=str(data["base"]["fingerprint"]),
                experts=tuple(ExpertRef(str(e["expert_id"]), str(e["name"]),
                                        str(e.get("contributor", "")), str(e.get("method", "")))
                              for e in data["experts"]),
                created_at=str(data.get("created_at", "")),
                created_at_unix=float(data.get("created_at_unix", 0.0)),
                parent=data.get("parent"), diff=str(data.get("diff", "")),
                modules=int(data.get("modules", 0)), format=int(data.get("format", 1)),
                extra={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(f"{source} is not a router version manifest (format 1 or "
                                  f"{VERSION_FORMAT}): {err}", field="version") from None

    @classmethod
    def read(cls, path: str | os.PathLike) -> VersionManifest:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidArgument(f"{path} does not exist: not a router version",
                                  field="version") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidArgument(f"{path} is not valid JSON: {err}", field="version") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"{path} is not a JSON object", field="version")
        return cls.from_json(data, str(path))


def key_file(root: str | os.PathLike, expert_id: str) -> Path:
    """Where a folder laid out by reference holds an expert's key shard."""
    return Path(root) / KEYS_DIR / expert_id / KEY_FILE


def bundle_folder(root: str | os.PathLike, expert_id: str) -> Path:
    """Where a folder laid out by reference holds an expert's bundle."""
    return Path(root) / EXPERTS_DIR / expert_id


def open_router(manifest: VersionManifest, *,
                key_shard: Callable[[str], str | os.PathLike],
                bundle: Callable[[str], str | os.PathLike],
                fields: Sequence[str] = ("keys",),
                max_adapter_bytes: int = DEFAULT_MAX_BYTES,
                shard_cache: dict | None = None) -> RouterWeights:
    """The router of a version by reference: every expert's keys (the `fields` of its key
    shard, routing.keys) in memory, its adapter paged in from its bundle within
    `max_adapter_bytes` (routing.paging).

    key_shard / bundle: expert id -> the local path of its key shard file / bundle folder
    (a callable may fetch it first). route() loads further key fields when a method needs
    them (RouterWeights.load_fields). shard_cache: a dict kept between calls, so that a
    process opening version after version reads each expert's shard once (it keeps only the
    shards of the version opened last).
    """
    ids = manifest.expert_ids
    shards = _cached_shards(ids, key_shard, tuple(fields), shard_cache)
    for ref, shard in zip(manifest.experts, shards, strict=True):
        if shard.expert_id != ref.expert_id:
            raise InvalidArgument(f"the key shard given for expert {ref.name!r} belongs to "
                                  f"expert {shard.expert_id[:12]}...", field="keys")
    pool = AdapterPool(AdapterFiles(lambda position: bundle(ids[position])), max_adapter_bytes)
    weights = router_from_keys(manifest.names, shards, base_model=manifest.base_model,
                               fingerprint=manifest.fingerprint, adapters=pool)
    weights.load_fields = lambda wanted: _load_fields(weights, manifest, key_shard, wanted)
    return weights


def _cached_shards(ids: list[str], key_shard: Callable[[str], str | os.PathLike],
                   fields: tuple[str, ...], cache: dict | None) -> list:
    if cache is None:
        return [read_key_shard(key_shard(i), fields) for i in ids]
    found = {i: cache.get((i, fields)) or read_key_shard(key_shard(i), fields) for i in ids}
    cache.clear()
    cache.update({(i, fields): shard for i, shard in found.items()})
    return [found[i] for i in ids]


def _load_fields(weights: RouterWeights, manifest: VersionManifest,
                 key_shard: Callable[[str], str | os.PathLike], wanted: Sequence[str]) -> None:
    """Fill key fields the router was opened without (each module's rows, in its order)."""
    missing = [f for f in wanted if any(getattr(m, f) is None for m in weights.modules.values())]
    if not missing:
        return
    # by collection position, not name: a caller may have renamed the experts
    shards = [read_key_shard(key_shard(i), missing) for i in manifest.expert_ids]
    position = {name: i for i, name in enumerate(weights.experts)}
    for module in weights.modules.values():
        for name in missing:
            parts = [shards[position[e]].get(module.name, name) for e in module.experts]
            if all(p is not None for p in parts):
                setattr(module, name, torch.stack(parts))


def load_router(folder: str | os.PathLike, *, fields: Sequence[str] = ("keys",),
                max_adapter_bytes: int = DEFAULT_MAX_BYTES) -> RouterWeights:
    """Read a router folder: a version by reference (version.json, keys/, experts/), a
    format-1 version folder (version.json beside router/), or a stacked router folder."""
    root = Path(folder)
    if (root / ROUTER_MANIFEST).is_file():
        return load_stacked(root)
    if not (root / VERSION_FILE).is_file():
        raise InvalidArgument(f"{folder} is not a router folder: it holds neither "
                              f"{VERSION_FILE} nor {ROUTER_MANIFEST}", field="router")
    manifest = VersionManifest.read(root / VERSION_FILE)
    if manifest.format == 1:
        return load_stacked(root / STACKED_DIR)
    return open_router(manifest, key_shard=lambda i: key_file(root, i),
                       bundle=lambda i: bundle_folder(root, i), fields=fields,
                       max_adapter_bytes=max_adapter_bytes)


def save_version(bundles: Sequence[Bundle], folder: str | os.PathLike, *,
                 names: Sequence[str] | None = None, base_model: str | None = None,
                 version_id: str = "local") -> Path:
    """Write loaded bundles as a router folder by reference (no coordinator needed): their
    bundles, key shards and a version.json; `load_router` reads it back, paging adapters.
    names: what the router calls each expert (default: the bundles' names)."""
    target = Path(folder)
    if target.exists():
        raise FileExistsError(f"{target} already exists: choose another folder")
    if not bundles:
        raise InvalidArgument("no experts given: a version holds at least one", field="experts")
    names = list(names) if names is not None else [b.name for b in bundles]
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=_parent(target)))
    try:
        for index, bundle in enumerate(bundles):
            # the expert id hashes the file hashes that save_bundle fills in: name it after
            written = save_bundle(bundle, staging / EXPERTS_DIR / f".{index}")
            written.rename(_parent(bundle_folder(staging, bundle.expert_id)) / bundle.expert_id) \
                if not bundle_folder(staging, bundle.expert_id).exists() else None
            write_key_shard(expert_keys(bundle), key_file(staging, bundle.expert_id))
        first = bundles[0].manifest
        manifest = VersionManifest(
            version_id=version_id, base_model=base_model or first.base_model,
            fingerprint=first.base_fingerprint,
            experts=tuple(ExpertRef(b.expert_id, n, method=b.manifest.method)
                          for b, n in zip(bundles, names, strict=True)),
            modules=len({m.name for b in bundles for m in b.manifest.modules}))
        (staging / VERSION_FILE).write_bytes(manifest.to_bytes())
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _parent(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent
