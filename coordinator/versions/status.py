"""Where a federation stands, in figures: what `gaggle-coordinator status` prints and the
metrics endpoint's gauges report (coordinator.metrics names them)."""

from __future__ import annotations

import time

from coordinator.checks.usage import cached_usage
from coordinator.store.experts import Store
from coordinator.store.versions import VersionStore
from coordinator.tracking.queue import OpQueue


def federation_status(store: Store, streams: int | None = None) -> dict[str, float]:
    """Experts stored, quarantined and waiting for a live version (and the oldest wait),
    versions live and rejected, MLflow calls queued and failed, upload streams (when the
    server gives them)."""
    experts = store.list_experts()
    versions = VersionStore(store.layout, store.objects)
    states = [version_state(versions, m.version_id) for m in versions.all()]
    current = versions.current_id()
    live_ids = set(versions.manifest(current).expert_ids) if current else set()
    waiting = [float(r.created_at) for r in experts
               if r.expert_id not in live_ids and not r.quarantine]
    queue = OpQueue(store.layout.tracking).counts()
    figures = {
        "experts": len(experts),
        "quarantined_experts": sum(1 for r in experts if r.quarantine),
        "experts_waiting": len(waiting),
        "oldest_waiting_seconds": time.time() - min(waiting) if waiting else 0.0,
        "versions_live": states.count("live"),
        "versions_rejected": states.count("rejected"),
        "tracking_calls_queued": queue["pending"],
        "tracking_calls_failed": queue["failed"],
    }
    if streams is not None:
        figures["uploads_in_flight"] = streams
    return figures


def version_state(versions: VersionStore, version_id: str) -> str:
    """live (checked and passed), rejected (failed a check) or unchecked (its check has not
    run yet: it never went live)."""
    if versions.rejection(version_id) is not None:
        return "rejected"
    return "live" if cached_usage(versions, version_id) is not None else "unchecked"
