"""A coordinator store filled with synthetic experts, for the assembly, tracking and version
tests: `make_store`, then `add_expert` (seeded random) or `commit` (a given bundle)."""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.store.experts import ExpertRecord, Store
from protocol.archive import pack_bundle_bytes
from protocol.bundle import BaseSpec, Bundle, save_bundle
from routing.synthetic import random_bundle


def make_store(root: Path, spec: BaseSpec) -> Store:
    """An empty coordinator store for the tiny base model."""
    store = Store(root)
    store.cache_base_spec(spec)
    return store


def commit(store: Store, bundle: Bundle, contributor: str = "alice") -> ExpertRecord:
    """Store a bundle the way an accepted upload is stored: staged folder, then commit."""
    staged = store.layout.staging / f"test-{bundle.name}-{time.monotonic_ns()}"
    save_bundle(bundle, staged)
    archive = pack_bundle_bytes(staged)
    return store.commit_expert(bundle, staged, contributor=contributor,
                               size_bytes=len(archive), upload_id="test-upload")


def add_expert(store: Store, spec: BaseSpec, name: str, seed: int, *, method: str = "lora",
               contributor: str = "alice", losses: list[float] | None = None) -> ExpertRecord:
    """A seeded random expert, with a training summary like a contributor's."""
    bundle = random_bundle(spec, name, method=method, seed=seed)
    now = round(time.time(), 3)
    bundle.manifest.training = {"expert_steps": 6, "gate_steps": 4,
                                "expert_loss_curve": losses or [3.0 - 0.1 * seed, 2.0, 1.5],
                                "started_at": now - 600 - seed, "finished_at": now - 300}
    return commit(store, bundle, contributor)
