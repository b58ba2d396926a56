"""Version history in MLflow: one run per expert, one `gaggle-router` model version per router
version, all sent through a durable on-disk queue so that an unreachable MLflow never blocks
the coordinator.

mlflow is imported only in the tracking room, and only when a call is replayed or read back:
importing it takes 5.3 s on a 2-core machine, which a coordinator that accepts uploads with
MLflow down, or a CLI command that only lists versions, should not pay.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator import metrics
from coordinator.store.layout import Layout, atomic_write
from coordinator.store.objects import DiskObjects
from coordinator.tracking import replay
from coordinator.tracking.names import (
    EXPERIMENT,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    REGISTERED_MODEL,
    TAG_EVAL_CONFIG,
    TAG_EVAL_PREFIX,
    TAG_VERSION,
    evaluation_op,
    expert_op,
    promotion_op,
    rejection_op,
    version_op,
)
from coordinator.tracking.queue import Op, OpQueue
from protocol.errors import Unavailable
from protocol.manifest import MANIFEST, read_manifest
from routing.version import EXPERTS_DIR, VersionManifest

# MLflow errors that mean "try again later" rather than "this call is wrong".
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                    "DEADLINE_EXCEEDED", "ABORTED"}
_MLFLOW_LOCK = threading.Lock()  # mlflow's fluent API keeps a process-global tracking URI
RECORDED_URI = "uri"  # in the tracking folder: where the serving coordinator tracks
log = logging.getLogger(__name__)


def default_tracking_uri(store: Layout | str | os.PathLike) -> str:
    """The embedded SQLite tracking store inside the coordinator's store folder."""
    return f"sqlite:///{(Layout.of(store).mlflow / 'mlflow.db').resolve()}"


def store_tracking_uri(store: Layout | str | os.PathLike) -> str:
    """Where a store's coordinator tracks: the URI `serve` recorded there, else the embedded
    store. Operator commands default to it, so none starts a second history by mistake."""
    path = Layout.of(store).tracking / RECORDED_URI
    try:
        return path.read_text(encoding="utf-8").strip() or default_tracking_uri(store)
    except FileNotFoundError:
        return default_tracking_uri(store)


def record_tracking_uri(store: Layout | str | os.PathLike, uri: str) -> None:
    """Remember where this store's coordinator tracks (serve calls it at start)."""
    atomic_write(Layout.of(store).tracking / RECORDED_URI, (uri + "\n").encode())


@dataclass(frozen=True)
class ReplayResult:
    """What one replay pass did."""

    replayed: int  # operations sent to MLflow (or found already there) in this pass
    pending: int  # operations still waiting, because MLflow is unreachable
    error: str | None = None  # why the pass stopped early


class Tracker:
    """Queues tracking calls in `<store>/tracking/` and replays them into MLflow in order."""

    def __init__(self, store: Layout | str | os.PathLike,
                 tracking_uri: str | None = None) -> None:
        self.layout = Layout.of(store)
        self.uri = tracking_uri or store_tracking_uri(self.layout)
        self.queue = OpQueue(self.layout.tracking)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    # ----- recording (cheap, local, never touches MLflow) -----

    def record_expert(self, payload: dict) -> bool:
        """Queue the MLflow run of an accepted expert (see `expert_payload`)."""
        queued = self.queue.enqueue(expert_op(payload["expert_id"]), "expert_run", payload)
        self.wake()
        return queued

    def record_version(self, payload: dict) -> bool:
        """Queue the registered model version of a router version (see `version_payload`)."""
        queued = self.queue.enqueue(version_op(payload["version_id"]), "router_version",
                                    payload)
        self.wake()
        return queued

    def record_rejection(self, payload: dict) -> bool:
        """Queue the run that shows a rejected version in MLflow (see `rejection_payload`);
        a rejected version is never registered, so `@latest` never resolves to it."""
        queued = self.queue.enqueue(rejection_op(payload["version_id"]), "rejection", payload)
        self.wake()
        return queued

    def record_promotion(self, version_id: str, sequence: int, *, by: str = "",
                         previous: str | None = None,
                         mean_accuracy: float | None = None, forced: bool = False) -> bool:
        """Queue moving alias `champion` to a version, and its row in the champion history:
        `sequence` tells promotions apart; who promoted, from which version, and the version's
        mean accuracy when it was evaluated."""
        op_id = promotion_op(sequence, version_id)
        payload = {"version_id": version_id, "sequence": sequence, "by": by,
                   "from": previous, "mean_accuracy": mean_accuracy, "forced": forced,
                   "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        queued = self.queue.enqueue(op_id, "promotion", payload)
        self.wake()
        return queued

    def record_evaluation(self, record: dict) -> bool:
        """Queue a version's evaluation (a `coordinator.checks.evaluation` record): its model
        version's `eval.*` tags and a run holding the metrics."""
        op_id = evaluation_op(record["version_id"], record["config_key"])
        queued = self.queue.enqueue(op_id, "evaluation", record)
        self.wake()
        return queued

    def has_expert(self, expert_id: str) -> bool:
        """Whether the run of this expert was ever queued (replayed or not)."""
        return self.queue.has(expert_op(expert_id))

    def has_version(self, version_id: str) -> bool:
        """Whether the model version of this router version was ever queued."""
        return self.queue.has(version_op(version_id))

    # ----- replay -----

    def replay(self) -> ReplayResult:
        """Send every pending call to MLflow in order; stop at the first unreachable moment."""
        with self.queue.replay_lock() as held:
            if not held:
                return ReplayResult(0, len(self.queue.pending()), "another replay is running")
            ops = self.queue.pending()
            if not ops:
                return ReplayResult(0, 0)
            return self._replay_ops(ops)

    def _replay_ops(self, ops: list[Op]) -> ReplayResult:
        from mlflow.exceptions import MlflowException

        done = 0
        for index, op in enumerate(ops):
            try:
                started = time.perf_counter()
                with _MLFLOW_LOCK:
                    client = self._client()
                    _HANDLERS[op.kind](self, client, op)
                metrics.TRACKING_SECONDS.labels(op.kind).observe(time.perf_counter() - started)
            except MlflowException as err:
                if err.error_code in _TRANSIENT_CODES:
                    self.queue.note_attempt(op, str(err))
                    return ReplayResult(done, len(ops) - index, _short(err))
                log.error("MLflow rejected tracking call %s for good: %s", op.op_id, err)
                self.queue.mark_failed(op, str(err))
                continue
            except OSError as err:  # connection refused, reset, timeout below mlflow
                self.queue.note_attempt(op, str(err))
                return ReplayResult(done, len(ops) - index, _short(err))
            self.queue.mark_done(op)
            done += 1
        return ReplayResult(done, 0)

    def _client(self):
        """An MlflowClient on this tracker's URI; the fluent API points there too."""
        _fail_fast_on_unreachable_server()
        import mlflow
        from mlflow import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)  # for log_model, which has no client form
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def experiment_id(self, client) -> str:
        """The id of experiment `gaggle`, created (artifacts inside the store when embedded)."""
        found = client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = (self.layout.mlflow / "artifacts").resolve().as_uri()
        # A model-training experiment: the UI opens on its runs, not on a GenAI traces page.
        return client.create_experiment(EXPERIMENT, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})

    @contextmanager
    def mlflow(self) -> Iterator:
        """An MlflowClient for direct calls (not queued: an operator command that must see
        MLflow now); Unavailable, naming the URI, when MLflow cannot be reached."""
        from mlflow.exceptions import MlflowException

        try:
            with _MLFLOW_LOCK:
                yield self._client()
        except (MlflowException, OSError) as err:
            raise Unavailable(f"MLflow at {self.uri} is unreachable ({_short(err)}); "
                              "start it or pass the right --tracking-uri") from None

    def artifacts(self) -> replay.ExpertArtifacts:
        """Where the replay finds the experts' files and their runs (for versions by
        reference: every expert's bundle and key shard is logged once, with its run)."""
        return replay.ExpertArtifacts(DiskObjects(self.layout.root), self.queue, self.uri,
                                      self.layout.versions)

    # ----- background thread -----

    def start(self, retry_s: float = 5.0) -> None:
        """Replay in a background thread: when woken, and every `retry_s` while calls wait."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, args=(retry_s,),
                                        name="gaggle-tracking", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    def _loop(self, retry_s: float) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                result = self.replay()
            except Exception:  # keep the thread alive: a bug here must not stop accepting
                log.exception("tracking replay failed")
                result = ReplayResult(0, 1, "error")
            if result.pending == 0 and not self._wake.is_set():
                self._idle.set()
            elif result.error:
                log.warning("MLflow at %s unreachable, %d calls queued: %s", self.uri,
                            result.pending, result.error)
            self._wake.wait(None if result.pending == 0 else retry_s)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending (True) or `timeout` seconds pass (False)."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    # ----- reading back (for `versions`) -----

    def model_versions(self) -> dict[str, dict]:
        """version id -> {"number", "aliases", "metrics"} from the registry; Unavailable if down."""
        from mlflow.exceptions import MlflowException

        try:
            with _MLFLOW_LOCK:
                client = self._client()
                versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
                aliases = _aliases(client)
        except (MlflowException, OSError) as err:
            raise Unavailable(f"MLflow at {self.uri} is unreachable ({_short(err)}); "
                              "start it or pass the right --tracking-uri") from None
        out = {}
        for mv in versions:
            version_id = mv.tags.get(TAG_VERSION)
            if version_id:
                out[version_id] = {
                    "number": int(mv.version),
                    "aliases": sorted(aliases.get(mv.version, [])),
                    "metrics": {k.removeprefix(TAG_EVAL_PREFIX): _number(v)
                                for k, v in mv.tags.items() if k.startswith(TAG_EVAL_PREFIX)},
                    "eval_config": mv.tags.get(TAG_EVAL_CONFIG),
                }
        return out


def expert_payload(record, objects) -> dict:
    """The run of an accepted expert (a store ExpertRecord, its bundle in `objects`): params,
    metrics and tags; its bundle is logged with it when replayed.

    Step counts and the LoRA rank become params; every other training figure a metric (a
    list of numbers, such as a loss curve, a metric series by step). The run spans the
    contributor's training (run_window).
    """
    manifest = read_manifest(objects.local_folder(EXPERTS_DIR, record.expert_id) / MANIFEST)
    params: dict[str, object] = {"contributor": record.contributor, "name": record.name,
                                 "method": record.method}
    if manifest.method == "lora":
        params["rank"] = manifest.peft.get("rank")
    metrics: dict[str, list[float]] = {}
    start_ms, end_ms = run_window(manifest.training, float(record.created_at))
    for key, value in sorted(manifest.training.items()):
        if key in ("started_at", "finished_at"):
            continue
        if key.endswith("steps") and not isinstance(value, list):
            params[key] = value
        else:
            metrics[key] = value if isinstance(value, list) else [value]
    return {"expert_id": record.expert_id, "name": record.name,
            "contributor": record.contributor,
            "created_at_ms": int(float(record.created_at) * 1000),
            "start_ms": start_ms, "end_ms": end_ms, "params": params, "metrics": metrics}


MAX_RUN_AGE_S = 30 * 24 * 3600.0  # an expert's run starts at most this long before acceptance


def run_window(training: dict, accepted_at: float) -> tuple[int, int]:
    """(start, end) of an expert's run in ms: the training's, as the contributor's clock
    measured it, moved back whole when that clock runs ahead of ours (it cannot have ended
    after we accepted it), and clipped to MAX_RUN_AGE_S before acceptance. Without the
    figures, both are the acceptance time."""
    end = float(training.get("finished_at", accepted_at))
    start = min(float(training.get("started_at", end)), end)
    skew = max(0.0, end - accepted_at)
    earliest = accepted_at - MAX_RUN_AGE_S
    start, end = max(start - skew, earliest), max(end - skew, earliest)
    return int(start * 1000), int(end * 1000)


def version_payload(manifest: VersionManifest, folder: Path, usage: dict | None) -> dict:
    """The model version of a router version, from its manifest and folder, and the report
    of its usage check (coordinator.checks.usage; None when it did not run)."""
    experts = [e.to_json() for e in manifest.experts]
    return {"version_id": manifest.version_id, "folder": str(Path(folder).resolve()),
            "n_experts": len(experts), "experts": experts,
            "expert_ids": manifest.expert_ids, "expert_names": manifest.names,
            "contributors": [e.contributor for e in manifest.experts],
            "parent": manifest.parent, "diff": manifest.diff,
            "base": manifest.base_model, "usage": usage}


def rejection_payload(manifest: VersionManifest, record: dict) -> dict:
    """The run of a rejected version: why, which experts it quarantined, what it held."""
    return {"version_id": manifest.version_id, "reason": record["reason"],
            "culprits": record["culprits"], "diff": manifest.diff,
            "n_experts": len(manifest.experts), "parent": manifest.parent,
            "at_ms": int(time.time() * 1000)}


def _aliases(client) -> dict[str, list[str]]:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(REGISTERED_MODEL)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    out: dict[str, list[str]] = {}
    for alias, number in model.aliases.items():
        out.setdefault(str(number), []).append(alias)
    return out


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _short(err: BaseException) -> str:
    return str(err).splitlines()[0][:300] if str(err) else type(err).__name__


def _fail_fast_on_unreachable_server() -> None:
    # mlflow retries an unreachable server with exponential backoff for minutes by default;
    # the queue already retries, so one quick attempt per call is what we want.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def _replay_expert_run(tracker: Tracker, client, op: Op) -> None:
    replay.replay_expert_run(client, tracker.experiment_id(client), op, tracker.artifacts())


def _replay_router_version(tracker: Tracker, client, op: Op) -> None:
    replay.replay_router_version(client, tracker.experiment_id(client), op,
                                 tracker.artifacts())


def _replay_evaluation(tracker: Tracker, client, op: Op) -> None:
    replay.replay_evaluation(client, tracker.experiment_id(client), op)


def _replay_promotion(tracker: Tracker, client, op: Op) -> None:
    replay.replay_promotion(client, op)


def _replay_rejection(tracker: Tracker, client, op: Op) -> None:
    replay.replay_rejection(client, tracker.experiment_id(client), op)


_HANDLERS: dict[str, Callable[[Tracker, object, Op], None]] = {
    "expert_run": _replay_expert_run,
    "router_version": _replay_router_version,
    "promotion": _replay_promotion,
    "evaluation": _replay_evaluation,
    "rejection": _replay_rejection,
}
