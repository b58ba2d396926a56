"""Assembling a router version on Ray: re-verify and load every bundle in parallel, stack the
experts module by module, and commit an immutable, content-addressed version folder.

Store layout (beside the expert store's own files)::

    versions/<version_id>/version.json   the version manifest (experts, parent, base, diff)
    versions/<version_id>/router/        the stacked router, as routing.version.save_router
                                         writes it (a self-contained, exportable folder)
    versions/CURRENT                     id of the current version (replaced atomically)

Ray tasks never open the store: the driver reads each chunk's bundle files and puts them in
Ray's object store once, so a worker on another machine, without the store's volume, loads and
re-verifies the very bytes the coordinator holds.

The version id hashes the base fingerprint and the ordered expert ids, so assembling the same
expert set again finds the existing version instead of making a new one. A version is written
into a staging folder and renamed into place; CURRENT moves only after that, so a failed
assembly leaves the previous version current.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.version_store import (
    ROUTER_DIR,
    VERSION_FILE,
    VersionStore,
    one_line_diff,
)
from protocol.errors import FailedPrecondition, GaggleError, InvalidArgument, InvalidBundle

FORMAT = 1
SHM = "/dev/shm"
log = logging.getLogger(__name__)
_RAY_LOCK = threading.Lock()


@dataclass(frozen=True)
class AssemblyConfig:
    """How assembly runs; the defaults suit a laptop."""

    ray_address: str | None = None  # join this Ray cluster; None starts a local one
    num_cpus: int = 2  # CPUs of the local Ray instance (ignored with ray_address)
    chunk_size: int = 256  # bundles loaded and stacked per Ray task: amortises task overhead
    # Custom Ray resources every assembly task and evaluation actor asks for, as (name,
    # amount) pairs: they pin that work to the nodes started with `--resources` naming them.
    resources: tuple[tuple[str, float], ...] = ()

    def ray_options(self) -> dict:
        """`.options(...)` for this coordinator's Ray tasks and actors."""
        return {"resources": dict(self.resources)} if self.resources else {}


@dataclass(frozen=True)
class ExpertEntry:
    """One expert of a version, as the version manifest records it."""

    expert_id: str  # the store's id of the expert
    name: str  # the key the router knows it by: contributor/name (ExpertRecord.key)
    contributor: str
    method: str
    path: str  # the expert's bundle folder in the store (read by the driver only)

    def to_json(self) -> dict:
        return {"expert_id": self.expert_id, "name": self.name, "contributor": self.contributor,
                "method": self.method}


def parse_resources(specs: list[str] | tuple[str, ...] | None) -> tuple[tuple[str, float], ...]:
    """`--ray-resource NAME=AMOUNT` values as AssemblyConfig.resources pairs."""
    pairs = []
    for spec in specs or ():
        name, _, amount = str(spec).partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not name.strip() or not value > 0:
            raise InvalidArgument(f"Ray resource {spec!r} must be NAME=AMOUNT with a positive "
                                  "amount, e.g. gaggle_worker=1", field="ray_resources")
        pairs.append((name.strip(), value))
    return tuple(pairs)


def ensure_ray(config: AssemblyConfig | None = None) -> None:
    """Start (or join) Ray once per process, on loopback unless an address is given."""
    import ray

    config = config or AssemblyConfig()
    with _RAY_LOCK:
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # quiet about tokens
        if config.ray_address:  # HOST:PORT, or ray://HOST:PORT through Ray Client
            _join(ray, config.ray_address)
            return
        # A local Ray stays on 127.0.0.1 (see the project's ENV notes); joining a cluster
        # must not: the cluster reaches this driver at the address Ray finds for it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=False)


def _join(ray, address: str, attempts: int = 3) -> None:
    """ray.init on an existing cluster. Ray Client's server starts one process per driver and
    on a busy head that start sometimes fails (ConnectionAbortedError); a new connection
    gets a new process, so try again a few times before giving up."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except ConnectionAbortedError as err:
            if attempt == attempts or not address.startswith("ray://"):
                raise
            log.warning("Ray Client at %s refused this driver (%s); trying again", address,
                        str(err).strip().splitlines()[-1][:200])
            time.sleep(attempt)


def select_experts(records: list) -> list[ExpertEntry]:
    """The expert set of a new version: the newest expert per (contributor, name).

    A contributor re-submitting a name replaces that expert. Inside the router, in usage
    reports and in version diffs an expert is known by its key, `contributor/name`
    (coordinator.store.expert_key).
    """
    newest: dict[tuple[str, str], object] = {}
    for record in sorted(records, key=lambda r: (float(r.created_at), r.expert_id)):
        newest[(record.contributor, record.name)] = record
    entries = [
        ExpertEntry(expert_id=r.expert_id, name=r.key,
                    contributor=r.contributor, method=r.method, path=str(r.path))
        for r in newest.values()
    ]
    return sorted(entries, key=lambda e: (e.name, e.expert_id))


def version_id_for(fingerprint: str, entries: list[ExpertEntry]) -> str:
    """Content address of a version: its base and its ordered experts (16 hex digits)."""
    text = json.dumps({"format": FORMAT, "base": fingerprint,
                       "experts": [[e.name, e.expert_id] for e in entries]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_files(path: str | os.PathLike, what: str = "expert folder") -> dict[str, bytes]:
    """The files of a stored folder (a bundle, a router), as bytes: what travels to Ray."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidBundle(f"{what} {folder} is missing from the store: the store was "
                            "changed on disk", field="path")
    return {child.name: child.read_bytes() for child in sorted(folder.iterdir())
            if child.is_file()}


def load_bundle_files(files: Mapping[str, bytes]):
    """Load and re-verify a bundle from its files' bytes.

    The bytes are written to a scratch folder and read back by `protocol.bundle.load_bundle`,
    so a worker checks exactly what a coordinator-local load would: file set, sha256 of every
    file, the strict manifest and safetensors headers, tensor shapes. The tensors are read
    into memory, so the folder goes at once.
    """
    from protocol.bundle import load_bundle

    size = sum(len(data) for data in files.values())
    with tempfile.TemporaryDirectory(prefix="gaggle-bundle-", dir=scratch_dir(size)) as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        return load_bundle(folder)


def scratch_dir(size: int) -> str | None:
    """Memory-backed /dev/shm when it has room for `size` bytes (several times faster than a
    disk for thousands of small files), else the default temp folder (None)."""
    try:
        if shutil.disk_usage(SHM).free > 4 * size + (64 << 20) and os.access(SHM, os.W_OK):
            return SHM
    except OSError:
        pass
    return None


def _stack_chunk(chunk: list[tuple[ExpertEntry, dict[str, bytes]]],
                 fingerprint: str | None) -> dict:
    """Ray task: re-verify and load a contiguous chunk of bundles from their bytes and stack
    them module by module.

    Returns {"fingerprint", "base_model", "modules": {module: ModuleRouter of this chunk's
    experts, in chunk order}}. Stacking here, not in the driver, keeps the work parallel and
    sends a few stacked tensors per module back instead of every expert's small ones.
    """
    from routing.stack import module_pieces, stack_module

    pieces: dict[str, list] = {}
    shapes: dict[str, tuple[int, int]] = {}
    out: dict = {"fingerprint": fingerprint, "base_model": None}
    for entry, files in chunk:
        bundle = load_bundle_files(files)
        _check_entry(bundle, entry, out["fingerprint"])
        out["fingerprint"], out["base_model"] = (bundle.manifest.base_fingerprint,
                                                 bundle.manifest.base_model)
        for module, piece in module_pieces(bundle).items():
            piece.expert = entry.name
            pieces.setdefault(module, []).append(piece)
            spec = bundle.modules[module]
            shapes[module] = (spec.d_in, spec.d_out)
    out["modules"] = {name: stack_module(name, *shapes[name], group)
                      for name, group in pieces.items()}
    return out


def _check_entry(bundle, entry: ExpertEntry, fingerprint: str | None) -> None:
    """The bundle is the expert the version names, on the version's base."""
    if bundle.expert_id != entry.expert_id:
        raise InvalidBundle(
            f"expert folder {entry.path} holds content {bundle.expert_id[:12]}..., not "
            f"expert {entry.expert_id[:12]}...: the store was changed on disk",
            field="expert_id")
    declared = bundle.manifest.base_fingerprint
    if fingerprint is not None and declared != fingerprint:
        raise InvalidBundle(
            f"expert {entry.expert_id} ({entry.name}) was trained on base fingerprint "
            f"{declared[:12]}..., the others on {fingerprint[:12]}...",
            field="base_model.fingerprint")


def concat_modules(parts: list) -> object:
    """One module's ModuleRouters from consecutive expert chunks, joined along the experts.

    LoRA factors are zero-padded to the largest rank, and kinds a chunk lacks are zero rows,
    exactly as `routing.stack.stack_module` lays out a single stack.
    """
    import torch

    from routing.stack import ModuleRouter

    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    rank = max(p.rank for p in parts)

    def joined(field: str, width: tuple[int, ...], pad_dim: int | None = None):
        if all(getattr(p, field) is None for p in parts):
            return None
        blocks = []
        for p in parts:
            block = getattr(p, field)
            if block is None:
                block = torch.zeros(len(p.experts), *width)
            elif pad_dim is not None and block.shape[pad_dim] < rank:
                pad = [0, 0] * (block.dim() - 1 - pad_dim) + [0, rank - block.shape[pad_dim]]
                block = torch.nn.functional.pad(block, pad)
            blocks.append(block)
        return torch.cat(blocks)

    with_activations = all(p.activations is not None for p in parts)
    lora_B = joined("lora_B", (first.d_out, rank), pad_dim=2)
    if lora_B is not None:  # the (E, r, d_out) storage stack_module gives, as a view
        lora_B = lora_B.transpose(1, 2).contiguous().transpose(1, 2)
    return ModuleRouter(
        name=first.name, d_in=first.d_in, d_out=first.d_out,
        experts=[e for p in parts for e in p.experts],
        kinds=[k for p in parts for k in p.kinds],
        keys=torch.cat([p.keys for p in parts]),
        prototypes=torch.cat([p.prototypes for p in parts]),
        scaling=torch.cat([p.scaling for p in parts]),
        activations=joined("activations", (first.d_in,)) if with_activations else None,
        lora_A=joined("lora_A", (rank, first.d_in), pad_dim=1),
        lora_B=lora_B,
        ia3_out=joined("ia3_out", (first.d_out,)),
        ia3_in=joined("ia3_in", (first.d_in,)),
    )


def build_router(entries: list[ExpertEntry], config: AssemblyConfig,
                 fingerprint: str | None = None, stages: dict[str, float] | None = None):
    """Load and stack `entries` on Ray into `routing.stack.RouterWeights`.

    The driver reads each chunk's bundle files and puts them in the object store once;
    parallel Ray tasks (placed by `config.resources`) re-verify, load and stack them per
    module; the driver joins each module's chunk stacks in order. stages: gets the seconds
    of both (tasks: reading, transfer and tasks; join).
    """
    import ray

    from routing.stack import RouterWeights

    ensure_ray(config)
    stages = {} if stages is None else stages
    started = time.perf_counter()
    task = ray.remote(_stack_chunk).options(**config.ray_options())
    refs = []
    for start in range(0, len(entries), config.chunk_size):
        chunk = [(entry, folder_files(entry.path))
                 for entry in entries[start:start + config.chunk_size]]
        refs.append(task.remote(ray.put(chunk), fingerprint))
    parts = _get(ray, refs)
    stages["tasks"] = time.perf_counter() - started
    fingerprints = {part["fingerprint"] for part in parts}
    if len(fingerprints) != 1:
        raise InvalidBundle(f"experts were trained on {len(fingerprints)} different base "
                            "models; a version routes experts of one base only",
                            field="base_model.fingerprint")
    by_module: dict[str, list] = {}
    for part in parts:  # chunk order is expert order
        for name, module in part["modules"].items():
            by_module.setdefault(name, []).append(module)
    modules = {name: concat_modules(by_module[name]) for name in sorted(by_module)}
    stages["join"] = time.perf_counter() - started - stages["tasks"]
    return RouterWeights(base_model=parts[0]["base_model"], fingerprint=fingerprints.pop(),
                         experts=[e.name for e in entries], modules=modules)


def _get(ray, refs: list) -> list:
    """ray.get, re-raising a task's GaggleError as itself (its message names the expert)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, GaggleError):
            raise err.cause from None
        raise


@dataclass(frozen=True)
class AssemblyResult:
    """The outcome of one assembly."""

    version_id: str
    manifest: dict  # the version manifest (version.json)
    created: bool  # False when the expert set matched an existing version
    seconds: float  # wall time of the assembly
    stages: dict[str, float] = field(default_factory=dict)  # tasks, join, save: seconds


def assemble(store_root: str | os.PathLike, records: list,
             config: AssemblyConfig | None = None,
             fingerprint: str | None = None, base_name: str | None = None) -> AssemblyResult:
    """Assemble an expert set (`records`: the store's ExpertRecords) into the current version.

    fingerprint: the federation's base fingerprint; every expert must match it (default: the
    first expert's). base_name: the coordinator's name for that base, which the version
    records and consumers load; a manifest's base name is the contributor's label only
    (default, without a coordinator: the first expert's label). Raises FailedPrecondition
    when there are no experts and InvalidBundle when a bundle fails its re-verification; then
    nothing changes.
    """
    started = time.perf_counter()
    config = config or AssemblyConfig()
    versions = VersionStore(store_root)
    entries = select_experts(records)
    if not entries:
        raise FailedPrecondition("the store holds no experts yet: submit one before assembling",
                                 field="experts")
    fingerprint = fingerprint or _declared_fingerprint(entries[0])
    version_id = version_id_for(fingerprint, entries)
    parent = versions.current_id()
    if versions.exists(version_id):  # same expert set as an existing version: reuse it
        versions.set_current(version_id)
        return AssemblyResult(version_id, versions.manifest(version_id), False,
                              time.perf_counter() - started)
    stages: dict[str, float] = {}
    weights = build_router(entries, config, fingerprint, stages)
    weights.base_model = base_name or weights.base_model
    saving = time.perf_counter()
    manifest = {
        "format": FORMAT, "version_id": version_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_at_unix": time.time(), "parent": parent,
        "base": {"name": weights.base_model, "fingerprint": weights.fingerprint},
        "experts": [e.to_json() for e in entries], "modules": len(weights.modules),
    }
    manifest["diff"] = one_line_diff(versions.manifest(parent) if parent else None, manifest)
    versions.commit(version_id, lambda folder: _write_version(folder, weights, manifest))
    versions.set_current(version_id)
    stages["save"] = time.perf_counter() - saving
    return AssemblyResult(version_id, manifest, True, time.perf_counter() - started, stages)


def assemble_store(store_root: str | os.PathLike,
                   config: AssemblyConfig | None = None) -> AssemblyResult:
    """Assemble every expert of a store, checked against the store's base model."""
    from coordinator.store import Store

    store = Store(store_root)
    try:
        base = store.cached_base_spec()
        return assemble(store_root, store.list_experts(), config,
                        base.fingerprint if base else None, base.name if base else None)
    finally:
        store.close()


def _write_version(folder: Path, weights, manifest: dict) -> None:
    from routing.version import save_router

    save_router(weights, folder / ROUTER_DIR, metadata={"gaggle_version": manifest})
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (folder / VERSION_FILE).write_text(text, encoding="utf-8")


def _declared_fingerprint(entry: ExpertEntry) -> str:
    from protocol.manifest import MANIFEST, read_manifest

    return read_manifest(Path(entry.path) / MANIFEST).base_fingerprint
