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
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ray

from coordinator.ray_cluster import RayConfig, ensure_ray, folder_files, scratch_dir
from coordinator.store.experts import Store
from coordinator.store.versions import (
    ROUTER_DIR,
    VERSION_FILE,
    VersionStore,
    one_line_diff,
)
from protocol.bundle import load_bundle
from protocol.errors import FailedPrecondition, GaggleError, InvalidBundle
from protocol.manifest import MANIFEST, read_manifest
from routing.stack import RouterWeights, concat_routers, stack_experts
from routing.version import save_router

FORMAT = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssemblyConfig(RayConfig):
    """How assembly runs: where Ray runs (RayConfig) and how bundles are batched into tasks."""

    chunk_size: int = 256  # bundles loaded and stacked per Ray task: amortises task overhead


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


def select_experts(records: list) -> list[ExpertEntry]:
    """The expert set of a new version: the newest expert per (contributor, name).

    A contributor re-submitting a name replaces that expert. Inside the router, in usage
    reports and in version diffs an expert is known by its key, `contributor/name`
    (coordinator.store.experts.expert_key).
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


def load_bundle_files(files: Mapping[str, bytes]):
    """Load and re-verify a bundle from its files' bytes.

    The bytes are written to a scratch folder and read back by `protocol.bundle.load_bundle`,
    so a worker checks exactly what a coordinator-local load would: file set, sha256 of every
    file, the strict manifest and safetensors headers, tensor shapes. The tensors are read
    into memory, so the folder goes at once.
    """
    size = sum(len(data) for data in files.values())
    with tempfile.TemporaryDirectory(prefix="gaggle-bundle-", dir=scratch_dir(size)) as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        return load_bundle(folder)


def _stack_chunk(chunk: list[tuple[ExpertEntry, dict[str, bytes]]],
                 fingerprint: str | None) -> RouterWeights:
    """Ray task: re-verify and load a contiguous chunk of bundles from their bytes and stack
    them (routing.stack.stack_experts), named by their keys, in chunk order.

    Stacking here, not in the driver, keeps the work parallel and sends a few stacked tensors
    per module back instead of every expert's small ones.
    """
    bundles = []
    for entry, files in chunk:
        bundle = load_bundle_files(files)
        _check_entry(bundle, entry, fingerprint)
        fingerprint = bundle.manifest.base_fingerprint  # the rest of the chunk must match it
        bundles.append(bundle)
    return stack_experts(bundles, names=[entry.name for entry, _ in chunk])


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


def build_router(entries: list[ExpertEntry], config: AssemblyConfig,
                 fingerprint: str | None = None, stages: dict[str, float] | None = None):
    """Load and stack `entries` on Ray into `routing.stack.RouterWeights`.

    The driver reads each chunk's bundle files and puts them in the object store once;
    parallel Ray tasks (placed by `config.resources`) re-verify, load and stack them per
    module; the driver joins each module's chunk stacks in order. stages: gets the seconds
    of both (tasks: reading, transfer and tasks; join).
    """
    ensure_ray(config)
    stages = {} if stages is None else stages
    started = time.perf_counter()
    task = ray.remote(_stack_chunk).options(**config.ray_options())
    refs = []
    for start in range(0, len(entries), config.chunk_size):
        chunk = [(entry, folder_files(entry.path))
                 for entry in entries[start:start + config.chunk_size]]
        refs.append(task.remote(ray.put(chunk), fingerprint))
    parts = _get(refs)
    stages["tasks"] = time.perf_counter() - started
    fingerprints = {part.fingerprint for part in parts}
    if len(fingerprints) != 1:
        raise InvalidBundle(f"experts were trained on {len(fingerprints)} different base "
                            "models; a version routes experts of one base only",
                            field="base_model.fingerprint")
    weights = concat_routers(parts)  # chunk order is expert order
    stages["join"] = time.perf_counter() - started - stages["tasks"]
    return weights


def _get(refs: list) -> list:
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
    store = Store(store_root)
    try:
        base = store.cached_base_spec()
        return assemble(store_root, store.list_experts(), config,
                        base.fingerprint if base else None, base.name if base else None)
    finally:
        store.close()


def _write_version(folder: Path, weights: RouterWeights, manifest: dict) -> None:
    save_router(weights, folder / ROUTER_DIR, metadata={"gaggle_version": manifest})
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (folder / VERSION_FILE).write_text(text, encoding="utf-8")


def _declared_fingerprint(entry: ExpertEntry) -> str:
    return read_manifest(Path(entry.path) / MANIFEST).base_fingerprint
