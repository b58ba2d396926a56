"""Promotion: moving alias `champion` to a router version, refused (unless forced) when the
version's evaluation is worse than the champion's. One rule for the CLI and the Admin service."""

from __future__ import annotations

from pathlib import Path

from coordinator.checks.evaluation import DEFAULT_MAX_DROP, MEAN, active_config, read_evaluation
from coordinator.store.versions import VersionStore
from coordinator.tracking.tracker import Tracker
from protocol.errors import FailedPrecondition, GaggleError


def promote_version(root: Path, version: str, *, force: bool, by: str,
                    tracker: Tracker | None = None,
                    max_drop: float | None = None) -> tuple[str, int, str | None]:
    """The promotion rule, one for the CLI and the Admin service: resolve `version` (an id or
    a unique prefix, checked by VersionStore.resolve), refuse it unless `force` when it is
    worse than the champion (check_not_worse), move CHAMPION, and queue the MLflow alias move
    when a Tracker is given, with who (`by`) promoted from which version for the history.
    Returns (version id, promotion sequence, note or None)."""
    versions = VersionStore(root)
    version_id, previous = versions.resolve(version), versions.champion_id()
    rejected = versions.rejection(version_id)
    if rejected is not None and not force:
        raise FailedPrecondition(
            f"version {version_id} failed its checks ({rejected['reason']}): it is never "
            "promoted unless an admin forces it with --force", field="version")
    note = None if force else check_not_worse(root, version_id, previous, tracker=tracker,
                                              max_drop=max_drop)
    sequence = versions.promote(version_id, forced=force)
    if tracker is not None:
        if rejected is not None:  # never registered: the alias needs a model version
            from coordinator.versions.record import record_version

            record_version(versions.manifest(version_id), versions, tracker)
        record = read_evaluation(root, version_id) or {}
        tracker.record_promotion(version_id, sequence, by=by, previous=previous,
                                 mean_accuracy=record.get("metrics", {}).get(MEAN),
                                 forced=force)
    return version_id, sequence, note


def promotion_threshold(root: Path, max_drop: float | None = None) -> float:
    """The largest allowed drop in mean accuracy: `max_drop` if given, else the `max_drop` of
    the evaluation config the coordinator runs with, else DEFAULT_MAX_DROP."""
    if max_drop is not None:
        return max_drop
    config = active_config(root)
    return config.max_drop if config is not None else DEFAULT_MAX_DROP


def check_not_worse(root: Path, candidate: str, champion: str | None, *,
                    tracker: Tracker | None = None, max_drop: float | None = None) -> str | None:
    """Raise FailedPrecondition when the candidate's mean accuracy is below the champion's by
    more than the threshold (see `promotion_threshold`; both evaluated under the same
    config); else return a note on what could not be compared, or None.

    The local evaluation records decide; with a `Tracker`, MLflow's `eval.*` tags stand in
    for a missing record.
    """
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

    def __init__(self, tracker: Tracker | None) -> None:
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
    record = read_evaluation(root, version_id)
    if record is not None and isinstance(record.get("metrics", {}).get(MEAN), float):
        return record.get("config_key"), record["metrics"][MEAN]
    tracked = registry.get(version_id)
    value = tracked.get("metrics", {}).get(MEAN)
    return (tracked.get("eval_config"), value) if isinstance(value, float) else None
