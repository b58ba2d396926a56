"""The version history as a table: every router version with its pointers, its MLflow model
version and aliases when MLflow is reachable, and its evaluation metrics."""

from __future__ import annotations

from pathlib import Path

from coordinator.checks.evaluation import read_evaluation
from coordinator.store.versions import VersionStore
from coordinator.tracking.tracker import Tracker, default_tracking_uri, store_tracking_uri
from coordinator.versions.status import version_state
from protocol.errors import GaggleError


def version_rows(root: Path, tracking_uri: str | None) -> tuple[list[dict], str | None]:
    """One dict per version (oldest first), with MLflow's view when reachable; and a note.

    Evaluation metrics come from the local records (so they show with MLflow down), then
    from the model versions' `eval.*` tags for what the local records lack.
    """
    versions = VersionStore(root)
    current, champion = versions.current_id(), versions.champion_id()
    registry: dict[str, dict] = {}
    note = None
    uri = tracking_uri or store_tracking_uri(root)
    embedded = Path(default_tracking_uri(root).removeprefix("sqlite:///"))
    if uri != default_tracking_uri(root) or embedded.exists():
        try:
            registry = Tracker(root, uri).model_versions()
        except GaggleError as err:
            note = str(err)
    rows = []
    manifests = versions.all()
    states = {m.version_id: version_state(versions, m.version_id) for m in manifests}
    live = [m.version_id for m in manifests if states[m.version_id] == "live"]
    for manifest in manifests:
        vid = manifest.version_id
        tracked = registry.get(vid, {})
        aliases = set(tracked.get("aliases", []))
        aliases |= {name for name, pointer in (("current", current), ("champion", champion))
                    if pointer == vid}
        if live and vid == live[-1]:
            aliases.add("latest")  # MLflow's latest: the newest version that went live
        evaluation = read_evaluation(root, vid) or {}
        rejected = versions.rejection(vid)
        rows.append({
            "state": states[vid], "reason": rejected["reason"] if rejected else None,
            "version_id": vid, "created_at": manifest.created_at,
            "n_experts": len(manifest.experts), "experts": manifest.names,
            "parent": manifest.parent, "diff": manifest.diff,
            "aliases": sorted(aliases), "mlflow_version": tracked.get("number"),
            "metrics": tracked.get("metrics", {}) | evaluation.get("metrics", {}),
        })
    return rows, note
