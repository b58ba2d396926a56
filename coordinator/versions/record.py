"""Queueing a version's and its experts' tracking calls: the one place that decides what of a
version goes to MLflow (coordinator.tracking replays the queue)."""

from __future__ import annotations

from coordinator.checks.usage import cached_usage
from coordinator.store.versions import VersionStore
from coordinator.tracking.tracker import Tracker, expert_payload, version_payload
from routing.version import VersionManifest


def record_version(manifest: VersionManifest, versions: VersionStore, tracker: Tracker,
                   usage: dict | None = None) -> None:
    """Queue the tracking of a version with the report of its usage check (default: the one
    cached in the version's folder): tracking records what it is given."""
    if usage is None:
        usage = cached_usage(versions, manifest.version_id)
    tracker.record_version(version_payload(manifest, versions.folder(manifest.version_id),
                                           usage))


def queue_untracked(records: list, versions: VersionStore, tracker: Tracker) -> None:
    """Queue the runs of stored experts and the model versions of checked router versions
    that were never queued: after a crash between a commit and its queueing, or a CLI
    assembly. A version whose check has not run is left to the assembler, which checks it,
    makes it current and queues it then."""
    for record in records:
        if not tracker.has_expert(record.expert_id):
            tracker.record_expert(expert_payload(record, versions.objects))
    for manifest in versions.all():
        live = cached_usage(versions, manifest.version_id) is not None and \
            versions.rejection(manifest.version_id) is None
        if live and not tracker.has_version(manifest.version_id):
            record_version(manifest, versions, tracker)
