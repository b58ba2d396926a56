"""The version commands of `gaggle-coordinator`: assemble, versions, diff, promote, export."""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import sys
from pathlib import Path

from coordinator.store.versions import ROUTER_DIR, VERSION_FILE, VersionStore
from protocol.errors import AlreadyExists, FailedPrecondition, GaggleError, NotFound


def _store_root(args: argparse.Namespace) -> Path:
    root = Path(args.store)
    if not root.is_dir():
        raise NotFound(f"store folder {root} does not exist: pass the coordinator's --store",
                       field="store")
    return root


def _replay(tracker) -> str:
    """Replay queued tracking calls now; one line saying how it went."""
    result = tracker.replay()
    if result.pending:
        return (f"MLflow at {tracker.uri} unreachable ({result.error}): {result.pending} "
                "tracking calls stay queued and are replayed when it is back")
    return f"MLflow at {tracker.uri}: up to date ({result.replayed} calls sent)"


def run_assemble_command(args: argparse.Namespace) -> int:
    """`assemble --store DIR`: a version from every stored expert, tracked in MLflow."""
    from coordinator.store.experts import Store
    from coordinator.tracking.tracker import Tracker, expert_payload, version_payload
    from coordinator.versions.assemble import AssemblyConfig, assemble_store, parse_resources

    root = _store_root(args)
    config = AssemblyConfig(ray_address=args.ray_address,
                            resources=parse_resources(args.ray_resources))
    result = assemble_store(root, config)
    manifest = result.manifest
    state = "new" if result.created else "unchanged, already"
    print(f"version {result.version_id} ({state}): {len(manifest['experts'])} experts, "
          f"{manifest.get('diff', '')}; {result.seconds:.1f} s")
    tracker = Tracker(root, args.tracking_uri)
    store = Store(root)
    try:
        for record in store.list_experts():
            if not tracker.queue.has(f"expert:{record.expert_id}"):
                tracker.record_expert(expert_payload(record))
    finally:
        store.close()
    tracker.record_version(version_payload(manifest, VersionStore(root).folder(result.version_id)))
    print(_replay(tracker))
    return 0


def version_rows(root: Path, tracking_uri: str | None) -> tuple[list[dict], str | None]:
    """One dict per version (oldest first), with MLflow's view when reachable; and a note.

    Evaluation metrics come from the local records (so they show with MLflow down), then
    from the model versions' `eval.*` tags for what the local records lack.
    """
    from coordinator.checks.evaluation import read_evaluation
    from coordinator.tracking.tracker import Tracker, default_tracking_uri

    versions = VersionStore(root)
    current, champion = versions.current_id(), versions.champion_id()
    registry: dict[str, dict] = {}
    note = None
    embedded = Path(default_tracking_uri(root).removeprefix("sqlite:///"))
    if tracking_uri or embedded.exists():
        try:
            registry = Tracker(root, tracking_uri).model_versions()
        except GaggleError as err:
            note = str(err)
    rows = []
    manifests = versions.all()
    for manifest in manifests:
        vid = manifest["version_id"]
        tracked = registry.get(vid, {})
        aliases = set(tracked.get("aliases", []))
        aliases |= {name for name, pointer in (("current", current), ("champion", champion))
                    if pointer == vid}
        if manifest is manifests[-1]:
            aliases.add("latest")
        evaluation = read_evaluation(root, vid) or {}
        rows.append({
            "version_id": vid, "created_at": manifest["created_at"],
            "n_experts": len(manifest["experts"]),
            "experts": [e["name"] for e in manifest["experts"]],
            "parent": manifest.get("parent"), "diff": manifest.get("diff", ""),
            "aliases": sorted(aliases), "mlflow_version": tracked.get("number"),
            "metrics": tracked.get("metrics", {}) | evaluation.get("metrics", {}),
        })
    return rows, note


def run_versions_command(args: argparse.Namespace) -> int:
    """`versions --store DIR`: id, time, experts, aliases, eval metrics (oldest first)."""
    rows, note = version_rows(_store_root(args), args.tracking_uri)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no router versions yet: submit experts or run `gaggle-coordinator assemble`")
        return 0
    print(f"{'version':<17} {'created (UTC)':<21} {'mlflow':>6} {'experts':>7}  "
          f"{'aliases':<24} metrics / diff")
    for row in rows:
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(row["metrics"].items()))
        number = row["mlflow_version"] if row["mlflow_version"] is not None else "-"
        print(f"{row['version_id']:<17} {row['created_at']:<21} {number:>6} "
              f"{row['n_experts']:>7}  {','.join(row['aliases']):<24} "
              f"{metrics or row['diff']}")
    return 0


def run_diff_command(args: argparse.Namespace) -> int:
    """`diff OLD NEW --store DIR`: experts added, removed, changed, and how much per module."""
    from coordinator.versions.diff import diff_versions

    diff = diff_versions(_store_root(args), args.old, args.new)
    if getattr(args, "json", False):
        print(json.dumps(diff.to_json(), indent=1))
        return 0
    print(f"diff {diff.old} -> {diff.new}")
    for name in diff.added:
        print(f"+ {name}  (expert {diff.expert_ids[name][1][:12]})")
    for name in diff.removed:
        print(f"- {name}  (expert {diff.expert_ids[name][0][:12]})")
    for name, modules in diff.changed.items():
        old_id, new_id = diff.expert_ids[name]
        moved = [m for m in modules if m.status != "unchanged"]
        print(f"~ {name}  (expert {old_id[:12]} -> {new_id[:12]}): {len(moved)} of "
              f"{len(modules)} modules changed")
        for m in moved:
            delta = "n/a" if m.delta is None else f"{m.delta:.4f}"
            gate = "n/a" if m.gate is None else f"{m.gate:.4f}"
            print(f"    {m.status:<8} {m.module:<48} delta {delta:>8}  gate {gate:>8}  "
                  f"{m.kinds}")
    if not (diff.added or diff.removed or diff.changed):
        print("no expert changes")
    return 0


def run_promote_command(args: argparse.Namespace) -> int:
    """`promote V --store DIR`: move alias `champion` (an older version rolls back).

    Refuses, unless --force, a version whose mean evaluation accuracy lies more than the
    threshold below the champion's (--max-drop, else the evaluation config's `max_drop`).
    """
    from coordinator.tracking.tracker import Tracker

    root = _store_root(args)
    tracker = Tracker(root, args.tracking_uri)
    version_id, _, note = promote_version(root, args.version, force=args.force,
                                          by=f"{getpass.getuser()} (CLI)", tracker=tracker,
                                          max_drop=getattr(args, "max_drop", None))
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"champion -> {version_id}")
    print(_replay(tracker))
    return 0


def promote_version(root: Path, version: str, *, force: bool, by: str, tracker=None,
                    max_drop: float | None = None) -> tuple[str, int, str | None]:
    """The promotion rule, one for the CLI and the Admin service: resolve `version` (an id or
    a unique prefix, checked by VersionStore.resolve), refuse it unless `force` when it is
    worse than the champion (check_not_worse), move CHAMPION, and queue the MLflow alias move
    when a Tracker is given, with who (`by`) promoted from which version for the history.
    Returns (version id, promotion sequence, note or None)."""
    from coordinator.checks.evaluation import MEAN, read_evaluation

    versions = VersionStore(root)
    version_id, previous = versions.resolve(version), versions.champion_id()
    note = None if force else check_not_worse(root, version_id, previous, tracker=tracker,
                                              max_drop=max_drop)
    sequence = versions.promote(version_id)
    if tracker is not None:
        record = read_evaluation(root, version_id) or {}
        tracker.record_promotion(version_id, sequence, by=by, previous=previous,
                                 mean_accuracy=record.get("metrics", {}).get(MEAN))
    return version_id, sequence, note


def promotion_threshold(root: Path, max_drop: float | None = None) -> float:
    """The largest allowed drop in mean accuracy: `max_drop` if given, else the `max_drop` of
    the evaluation config the coordinator runs with, else DEFAULT_MAX_DROP."""
    from coordinator.checks.evaluation import DEFAULT_MAX_DROP, active_config

    if max_drop is not None:
        return max_drop
    config = active_config(root)
    return config.max_drop if config is not None else DEFAULT_MAX_DROP


def check_not_worse(root: Path, candidate: str, champion: str | None, *, tracker=None,
                    max_drop: float | None = None) -> str | None:
    """Raise FailedPrecondition when the candidate's mean accuracy is below the champion's by
    more than the threshold (see `promotion_threshold`; both evaluated under the same
    config); else return a note on what could not be compared, or None.

    The local evaluation records decide; with a `Tracker`, MLflow's `eval.*` tags stand in
    for a missing record.
    """
    from coordinator.checks.evaluation import MEAN

    if champion is None or champion == candidate:
        return None
    max_drop = promotion_threshold(Path(root), max_drop)
    registry = _Registry(tracker)
    new, old = _evaluation_of(root, registry, candidate), _evaluation_of(root, registry, champion)
    if new is None or old is None:
        missing = candidate if new is None else champion
        return f"version {missing} has no evaluation: promoting without comparing accuracy"
    if new[0] != old[0]:
        return (f"versions {candidate} and {champion} were evaluated under different configs "
                "(different tasks or settings): promoting without comparing accuracy")
    drop = old[1] - new[1]
    if drop > max_drop:
        raise FailedPrecondition(
            f"version {candidate} has mean {MEAN} {new[1]:.4f}, {drop:.4f} below champion "
            f"{champion}'s {old[1]:.4f}, more than the allowed drop {max_drop:g}: pass --force "
            "to promote it anyway, or --max-drop to allow a larger drop", field="version")
    return None


class _Registry:
    """MLflow's model versions, read at most once, and only if a local record is missing."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self._versions: dict[str, dict] | None = None

    def get(self, version_id: str) -> dict:
        if self._versions is None:
            self._versions = {}
            uri = getattr(self.tracker, "uri", "")
            embedded_missing = uri.startswith("sqlite:///") and not Path(
                uri.removeprefix("sqlite:///")).exists()
            if self.tracker is not None and not embedded_missing:
                try:
                    self._versions = self.tracker.model_versions()
                except GaggleError:
                    pass  # unreachable: only the local records count
        return self._versions.get(version_id, {})


def _evaluation_of(root: Path, registry: _Registry,
                   version_id: str) -> tuple[str | None, float] | None:
    """(config key, mean accuracy) of a version, from its local record or MLflow; or None."""
    from coordinator.checks.evaluation import MEAN, read_evaluation

    record = read_evaluation(root, version_id)
    if record is not None and isinstance(record.get("metrics", {}).get(MEAN), float):
        return record.get("config_key"), record["metrics"][MEAN]
    tracked = registry.get(version_id)
    value = tracked.get("metrics", {}).get(MEAN)
    return (tracked.get("eval_config"), value) if isinstance(value, float) else None


def run_export_command(args: argparse.Namespace) -> int:
    """`export V --out DIR`: a router folder `routing.version.load_router` reads alone."""
    from routing.version import load_router

    versions = VersionStore(_store_root(args))
    version_id = versions.resolve(args.version)
    out = Path(args.out)
    if out.exists():
        raise AlreadyExists(f"--out {out} already exists: choose a new folder", field="out")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(versions.folder(version_id) / ROUTER_DIR, staging)
    shutil.copy2(versions.folder(version_id) / VERSION_FILE, staging / VERSION_FILE)
    weights = load_router(staging)  # proves the export is whole before it appears
    staging.rename(out)
    print(f"exported version {version_id} ({len(weights.experts)} experts, "
          f"{len(weights.modules)} modules) to {out}")
    return 0
