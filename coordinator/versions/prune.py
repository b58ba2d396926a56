"""Pruning: removing the versions an operator no longer keeps, and every object only they held.

Kept, whatever the operator asks: the newest `keep_last` versions, the current version, the
champion, the newest (what `@latest` resolves to) and any version whose tracking call is still
queued (MLflow has not logged it yet). Kept with them: every expert a kept version refers to
and every expert of the store's present expert set (the next version is built from it). What
is left goes: the other versions' folders and evaluation records, the key shards and bundles
of experts nothing kept refers to (experts their contributor has since replaced, and only
those; their index rows too), and, in MLflow, the registered model versions of the removed
versions and the logged copies of the removed experts' files (their runs and metrics stay).

`plan_prune` only looks; `apply_prune` removes what a plan lists, so `--dry-run` says exactly
what a real run would free.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.store.experts import EXPERTS, Store
from coordinator.store.layout import Layout
from coordinator.store.versions import VersionStore
from coordinator.tracking.names import REGISTERED_MODEL, version_op
from coordinator.tracking.queue import OpQueue
from coordinator.versions.assemble import select_experts
from protocol.errors import InvalidArgument
from routing.version import KEYS_DIR

log = logging.getLogger(__name__)


@dataclass
class PrunePlan:
    """What a prune keeps and removes, with the bytes it frees in the store."""

    kept: list[str]  # version ids, oldest first
    versions: list[str] = field(default_factory=list)  # version ids to remove
    keys: list[str] = field(default_factory=list)  # expert ids whose key shard goes
    experts: list[str] = field(default_factory=list)  # expert ids whose bundle goes
    freed: dict[str, int] = field(default_factory=dict)  # kind -> bytes

    def summary(self) -> str:
        total = sum(self.freed.values())
        return (f"keep {len(self.kept)} versions; remove {len(self.versions)} versions, "
                f"{len(self.keys)} key shards and {len(self.experts)} replaced experts' "
                f"bundles: {total / 1e6:.1f} MB in the store")


def plan_prune(store: Store, keep_last: int) -> PrunePlan:
    """What pruning to the newest `keep_last` versions would remove (nothing is changed)."""
    if keep_last < 1:
        raise InvalidArgument(f"--keep-last must be at least 1, got {keep_last}",
                              field="keep_last")
    versions = VersionStore(store.layout, store.objects)
    manifests = versions.all()
    untracked = {op.op_id for op in OpQueue(store.layout.tracking).pending()}
    pinned = {versions.current_id(), versions.champion_id()}
    if manifests:
        pinned.add(manifests[-1].version_id)
    kept = [m for i, m in enumerate(manifests)
            if i >= len(manifests) - keep_last or m.version_id in pinned
            or version_op(m.version_id) in untracked]
    removed = [m for m in manifests if m not in kept]
    needed = {i for m in kept for i in m.expert_ids}
    needed |= {e.expert_id for e in select_experts(store.list_experts())}
    plan = PrunePlan(kept=[m.version_id for m in kept],
                     versions=[m.version_id for m in removed])
    plan.keys = [i for i in store.objects.list(KEYS_DIR) if i not in needed]
    plan.experts = [i for i in store.objects.list(EXPERTS) if i not in needed]
    plan.freed = {
        "versions": sum(_folder_bytes(versions.folder(v)) for v in plan.versions),
        "keys": sum(store.objects.size(KEYS_DIR, i) for i in plan.keys),
        "experts": sum(store.objects.size(EXPERTS, i) for i in plan.experts)}
    return plan


def apply_prune(store: Store, plan: PrunePlan, tracking_uri: str | None = None) -> int:
    """Remove what `plan` lists, MLflow's copies first (so a failure there changes nothing
    in the store); returns the store bytes freed. tracking_uri: the MLflow the coordinator
    tracks into (None: the embedded one, when it exists)."""
    _prune_mlflow(store.layout, plan, tracking_uri)
    versions = VersionStore(store.layout, store.objects)
    layout = store.layout
    for version_id in plan.versions:
        shutil.rmtree(versions.folder(version_id), ignore_errors=True)
        (layout.evaluations / f"{version_id}.json").unlink(missing_ok=True)
    freed = plan.freed.get("versions", 0)
    for expert_id in plan.keys:
        freed += store.objects.delete(KEYS_DIR, expert_id)
    for expert_id in plan.experts:
        freed += store.objects.delete(EXPERTS, expert_id)
        with store.transaction() as conn:
            conn.execute("DELETE FROM experts WHERE expert_id = ?", (expert_id,))
    log.info("pruned %d versions, %d key shards, %d bundles", len(plan.versions),
             len(plan.keys), len(plan.experts))
    return freed


def _prune_mlflow(layout: Layout, plan: PrunePlan, tracking_uri: str | None) -> None:
    """Delete the removed versions' model versions and the removed experts' logged files."""
    from coordinator.tracking.tracker import Tracker, default_tracking_uri, store_tracking_uri

    uri = tracking_uri or store_tracking_uri(layout)
    if uri == default_tracking_uri(layout) and not (layout.mlflow / "mlflow.db").is_file():
        return  # nothing was ever tracked here
    tracker = Tracker(layout, uri)
    with tracker.mlflow() as client:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        from coordinator.tracking.replay import find_model_version

        for version_id in plan.versions:
            found = find_model_version(client, version_id)
            if found is not None:
                client.delete_model_version(REGISTERED_MODEL, found.version)
        for expert_id in sorted(set(plan.keys) | set(plan.experts)):
            noted = tracker.queue.expert_run(tracker.uri, expert_id)
            if noted is None:
                continue
            run_id, logged = noted
            repository = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
            for kind, folder in ((KEYS_DIR, "keys"), (EXPERTS, "bundle")):
                gone = kind == KEYS_DIR and expert_id in plan.keys or \
                    kind == EXPERTS and expert_id in plan.experts
                if gone and kind in logged:
                    repository.delete_artifacts(folder)
                    logged.discard(kind)
            tracker.queue.note_expert_run(tracker.uri, expert_id, run_id, logged)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

