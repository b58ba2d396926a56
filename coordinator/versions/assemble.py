"""Assembling a router version by reference: verify each new expert on Ray and derive its key
shard once, then commit a small, content-addressed version manifest that names its experts.

A version holds no expert's tensors: its version.json lists the experts by id, and their
bundles and key shards are the store's objects (coordinator.store.objects), written once per
expert and shared by every version that holds it. After one arrival, assembly reads and
verifies that one bundle, writes its key shard and a manifest of a few hundred bytes per
expert; nothing else. The driver never holds more than a window of new bundles at once.

Ray tasks never open the store: the driver reads each new bundle's files and puts them in
Ray's object store, so a worker on another machine, without the store's volume, re-verifies
the very bytes the coordinator holds and sends back the key shard's bytes.

The version id hashes the base fingerprint and the ordered expert ids, so assembling the same
expert set again finds the existing version instead of making a new one. CURRENT moves only
after the version is committed, so a failed assembly leaves the previous version current.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ray

from coordinator.ray_cluster import RayConfig, ensure_ray, scratch_dir
from coordinator.store.experts import EXPERTS, Store
from coordinator.store.versions import VersionStore, one_line_diff
from protocol.bundle import load_bundle
from protocol.errors import FailedPrecondition, GaggleError, InvalidBundle
from protocol.manifest import MANIFEST, read_manifest
from routing.keys import expert_keys, key_shard_bytes
from routing.version import KEY_FILE, KEYS_DIR, ExpertRef, VersionManifest

FORMAT = 1  # of the version id's hashed text: unchanged, so an expert set keeps its id
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssemblyConfig(RayConfig):
    """How assembly runs: where Ray runs (RayConfig) and how new experts are batched."""

    chunk_size: int = 4  # new bundles verified per Ray task: amortises task overhead
    # Ray tasks in flight at once: bounds the bundles the driver and Ray hold at a time
    # (chunk_size x in_flight x one bundle, ~21 MB for a rank-16 SmolLM2 expert)
    in_flight: int = 4


def select_experts(records: list) -> list[ExpertRef]:
    """The expert set of a new version: the newest expert per (contributor, name) that is not
    in quarantine.

    A contributor re-submitting a name replaces that expert (a quarantined one included).
    Inside the router, in usage reports and in version diffs an expert is known by its key,
    `contributor/name` (coordinator.store.experts.expert_key).
    """
    newest: dict[tuple[str, str], object] = {}
    for record in sorted(records, key=lambda r: (float(r.created_at), r.expert_id)):
        newest[(record.contributor, record.name)] = record
    newest = {key: r for key, r in newest.items() if not getattr(r, "quarantine", None)}
    entries = [ExpertRef(expert_id=r.expert_id, name=r.key, contributor=r.contributor,
                         method=r.method) for r in newest.values()]
    return sorted(entries, key=lambda e: (e.name, e.expert_id))


def version_id_for(fingerprint: str, entries: list[ExpertRef]) -> str:
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


def _key_shards(chunk: list[tuple[ExpertRef, dict[str, bytes]]],
                fingerprint: str) -> list[bytes]:
    """Ray task: re-verify a chunk of bundles from their bytes and derive each one's key
    shard (routing.keys), returned as bytes in chunk order."""
    shards = []
    for entry, files in chunk:
        bundle = load_bundle_files(files)
        _check_entry(bundle, entry, fingerprint)
        shards.append(key_shard_bytes(expert_keys(bundle)))
    return shards


def _check_entry(bundle, entry: ExpertRef, fingerprint: str) -> None:
    """The bundle is the expert the version names, on the version's base."""
    if bundle.expert_id != entry.expert_id:
        raise InvalidBundle(
            f"the stored bundle of expert {entry.name} holds content "
            f"{bundle.expert_id[:12]}..., not expert {entry.expert_id[:12]}...: the store was "
            "changed on disk", field="expert_id")
    declared = bundle.manifest.base_fingerprint
    if declared != fingerprint:
        raise InvalidBundle(
            f"expert {entry.expert_id} ({entry.name}) was trained on base fingerprint "
            f"{declared[:12]}..., the federation's base has {fingerprint[:12]}...",
            field="base_model.fingerprint")


def build_key_shards(store: Store, entries: list[ExpertRef], config: AssemblyConfig,
                     fingerprint: str, stop: Callable[[], bool] = lambda: False) -> int:
    """Verify and derive the key shard of every expert in `entries` that has none yet, on
    Ray, storing each as it arrives; returns how many were built.

    At most `config.in_flight` tasks of `config.chunk_size` bundles run at once, so the
    driver's memory does not grow with the number of experts. stop: polled between tasks;
    when it turns true the tasks still running are cancelled and Interrupted is raised
    (the shards stored so far stay: they are valid and content-addressed).
    """
    missing = [e for e in entries if not store.objects.exists(KEYS_DIR, e.expert_id)]
    if not missing:
        return 0
    ensure_ray(config)
    task = ray.remote(_key_shards).options(**config.ray_options())
    chunks = [missing[i:i + config.chunk_size] for i in range(0, len(missing),
                                                              config.chunk_size)]
    running: dict = {}
    try:
        while chunks or running:
            while chunks and len(running) < config.in_flight:
                chunk = chunks.pop(0)
                files = [(e, store.objects.get(EXPERTS, e.expert_id)) for e in chunk]
                running[task.remote(ray.put(files), fingerprint)] = chunk
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            if stop():
                raise Interrupted("assembly stopped: the coordinator is shutting down")
            for ref in done:
                chunk = running.pop(ref)
                for entry, data in zip(chunk, _get(ref), strict=True):
                    store.objects.put(KEYS_DIR, entry.expert_id, {KEY_FILE: data})
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
    return len(missing)


class Interrupted(Exception):
    """An assembly abandoned because the coordinator is stopping (it runs again on start)."""


def _get(ref):
    """ray.get, re-raising a task's GaggleError as itself (its message names the expert)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, GaggleError):
            raise err.cause from None
        raise


@dataclass(frozen=True)
class AssemblyResult:
    """The outcome of one assembly."""

    version_id: str
    manifest: VersionManifest
    created: bool  # False when the expert set matched an existing version
    seconds: float  # wall time of the assembly
    stages: dict[str, float] = field(default_factory=dict)  # keys, save: seconds
    new_experts: int = 0  # key shards built for it


def assemble(store: Store, records: list, config: AssemblyConfig | None = None,
             fingerprint: str | None = None, base_name: str | None = None, *,
             make_current: bool = True,
             stop: Callable[[], bool] = lambda: False) -> AssemblyResult:
    """Assemble an expert set (`records`: the store's ExpertRecords) into a version.

    fingerprint: the federation's base fingerprint; every expert must match it (default: the
    first expert's). base_name: the coordinator's name for that base, which the version
    records and consumers load; a manifest's base name is the contributor's label only
    (default, without a coordinator: the first expert's label). make_current: move CURRENT
    to it (the serving coordinator does so only after the version's checks). Raises
    FailedPrecondition when there are no experts and InvalidBundle when a bundle fails its
    re-verification; then nothing changes.
    """
    started = time.perf_counter()
    config = config or AssemblyConfig()
    versions = VersionStore(store.layout, store.objects)
    entries = select_experts(records)
    if not entries:
        raise FailedPrecondition("the store holds no experts yet: submit one before assembling",
                                 field="experts")
    declared = read_manifest(store.bundle_folder(entries[0].expert_id) / MANIFEST)
    fingerprint = fingerprint or declared.base_fingerprint
    version_id = version_id_for(fingerprint, entries)
    parent = versions.current_id()
    if versions.exists(version_id):  # same expert set as an existing version: reuse it
        if make_current:
            versions.set_current(version_id)
        return AssemblyResult(version_id, versions.manifest(version_id), False,
                              time.perf_counter() - started)
    built = build_key_shards(store, entries, config, fingerprint, stop)
    stages = {"keys": time.perf_counter() - started}
    saving = time.perf_counter()
    manifest = VersionManifest(
        version_id=version_id, base_model=base_name or declared.base_model,
        fingerprint=fingerprint, experts=tuple(entries),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        created_at_unix=time.time(), parent=parent,
        modules=_module_count(store, entries))
    manifest = VersionManifest(**{**manifest.__dict__, "diff": one_line_diff(
        versions.manifest(parent) if parent else None, manifest)})
    versions.commit(manifest)
    if make_current:
        versions.set_current(version_id)
    stages["save"] = time.perf_counter() - saving
    return AssemblyResult(version_id, manifest, True, time.perf_counter() - started, stages,
                          built)


def _module_count(store: Store, entries: list[ExpertRef]) -> int:
    """Modules the version routes: the union over its experts' key shards' headers."""
    from routing.keys import read_key_shard

    modules: set[str] = set()
    for entry in entries:
        shard = read_key_shard(store.objects.local_folder(KEYS_DIR, entry.expert_id) / KEY_FILE,
                               fields=())
        modules.update(shard.modules)
    return len(modules)


def assemble_store(store: Store, config: AssemblyConfig | None = None, *,
                   make_current: bool = True) -> AssemblyResult:
    """Assemble every expert of a store, checked against the store's base model."""
    base = store.cached_base_spec()
    return assemble(store, store.list_experts(), config,
                    base.fingerprint if base else None, base.name if base else None,
                    make_current=make_current)
