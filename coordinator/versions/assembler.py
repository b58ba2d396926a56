"""The assembler behind the server's `on_accepted` hook: at most one assembly in flight, in a
background thread; experts accepted meanwhile go into the next assembly.

The hook only appends to a list and sets an event, so an upload RPC never waits for Ray or
MLflow. A version goes current only after its usage check, which runs in a child process
(coordinator.checks.check_process): the coordinator holds no model and no expert. Tracking
calls go through `Tracker`'s on-disk queue and its own thread; evaluation of each new version
(when configured) through `Evaluator`'s own thread.
"""

from __future__ import annotations

import logging
import threading
import time

from coordinator import metrics
from coordinator.checks.check_process import CheckProcess
from coordinator.checks.evaluation import MEAN, EvaluationConfig
from coordinator.checks.evaluator import Evaluator
from coordinator.checks.usage import USAGE_FILE
from coordinator.checks.verdict import Verdict, judge
from coordinator.ray_cluster import parse_resources
from coordinator.store.experts import Store
from coordinator.store.versions import VersionStore
from coordinator.tracking.tracker import (
    Tracker,
    expert_payload,
    record_tracking_uri,
    rejection_payload,
)
from coordinator.versions.assemble import (
    AssemblyConfig,
    AssemblyResult,
    Interrupted,
    assemble,
    select_experts,
)
from coordinator.versions.promotion import check_not_worse
from coordinator.versions.record import queue_untracked, record_version
from protocol.errors import FailedPrecondition, GaggleError
from routing.layers import Cancelled
from routing.version import VersionManifest

log = logging.getLogger(__name__)
# How long a stopping coordinator waits for its threads: `docker stop` allows 10 s in all.
SHUTDOWN_S = 6.0


class Assembler:
    """Owns the assembly thread of a serving coordinator (and its tracker, when given)."""

    def __init__(self, store: Store, *, config: AssemblyConfig | None = None,
                 tracker: Tracker | None = None, evaluator: Evaluator | None = None,
                 reconcile_s: float = 60.0) -> None:
        """evaluator: given each version assembled (None: no evaluation); reconcile_s: how
        often to look for stored experts missing from the current version."""
        self.store = store
        self.config = config or AssemblyConfig()
        self.tracker = tracker
        self.evaluator = evaluator
        self.versions = VersionStore(store.layout, store.objects)
        self.checks = CheckProcess()  # the usage check runs in a child process
        self.last_result: AssemblyResult | None = None
        self.last_error: str | None = None
        self.assemblies = 0  # finished attempts, successful or not
        self.reconcile_s = reconcile_s
        self._failed: frozenset[str] = frozenset()  # expert set whose assembly last failed
        self._accepted: list = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._busy = False
        self._stop = False
        self._stopping = threading.Event()  # polled inside an assembly and its check
        self._thread: threading.Thread | None = None

    def on_accepted(self, record) -> None:
        """The server's hook, called after an expert is committed: returns at once."""
        with self._lock:
            self._accepted.append(record)
            self._busy = True
        self._wanted.set()

    def request(self) -> None:
        """Ask for an assembly of the current expert set (no-op if nothing changed)."""
        with self._lock:
            self._busy = True
        self._wanted.set()

    def start(self) -> Assembler:
        """Start the thread, which first catches up on what happened while none ran."""
        if self._thread is None:
            if self.tracker is not None:
                self.tracker.start()
            if self.evaluator is not None:
                self.evaluator.start()
            self.versions.clean_staging()
            self._busy = True  # until the catch-up has looked
            self._thread = threading.Thread(target=self._loop, name="gaggle-assembler",
                                            daemon=True)
            self._thread.start()
        return self

    def _catch_up(self) -> None:
        """Queue runs of stored experts never tracked, and assemble if CURRENT is stale.

        Runs at start and every `reconcile_s`, so an expert committed without the hook (a
        crash between commit and hook, a recovery) still reaches a version.
        """
        records = self.store.list_experts()
        if self.tracker is not None:
            queue_untracked(records, self.versions, self.tracker)
        wanted = frozenset(e.expert_id for e in select_experts(records))
        current = self.versions.current_id()
        have = set(self.versions.manifest(current).expert_ids) if current else set()
        if records and wanted != have and wanted != self._failed:
            self.request()

    def _loop(self) -> None:
        self._guarded(self._catch_up)
        self._settle()
        while True:
            woken = self._wanted.wait(self.reconcile_s)
            with self._lock:
                if self._stop:
                    return
                self._wanted.clear()
                accepted, self._accepted = self._accepted, []
            if woken:
                self._run_once(accepted)
            else:
                self._guarded(self._catch_up)
            self._settle()

    def _settle(self) -> None:
        with self._lock:
            if not self._wanted.is_set():
                self._busy = False
                self._idle.notify_all()

    def _guarded(self, step) -> None:
        try:
            step()
        except Exception:  # keep the thread alive; the next reconcile tries again
            log.exception("assembler catch-up failed")

    def _run_once(self, accepted: list) -> None:
        attempted: frozenset[str] = frozenset()
        try:
            if self.tracker is not None:
                for record in accepted:
                    self.tracker.record_expert(expert_payload(record, self.store.objects))
            records = self.store.list_experts()
            attempted = frozenset(e.expert_id for e in select_experts(records))
            log.info("assembling a version of %d experts", len(attempted))
            self._make_live(self._assemble(records), records)
        except (Interrupted, Cancelled):
            log.info("stopping: the version of %d experts is abandoned and made again on "
                     "start", len(attempted))
        except GaggleError as err:
            self._failed = attempted
            self.last_error = str(err)
            log.error("assembly failed, version %s stays current: %s",
                      self.versions.current_id(), err)
        except Exception as err:  # Ray down, a bug: keep the thread; reconcile retries it
            self.last_error = f"{type(err).__name__}: {err}"
            log.exception("assembly failed, version %s stays current",
                          self.versions.current_id())
        finally:
            self.assemblies += 1

    def _make_live(self, result: AssemblyResult, records: list) -> None:
        """Check a version, then make it current, or reject it and quarantine the experts
        its checks name (the next version, without them, is assembled at once). Tracking and
        evaluation follow. Each stage's seconds go to the log."""
        manifest, version_id = result.manifest, result.version_id
        log.info("version %s assembled: %d experts (%s), %d new key shards, %.1f s",
                 version_id, len(manifest.experts), manifest.diff or "no changes",
                 result.new_experts, result.seconds)
        if result.created:
            metrics.STAGE_SECONDS.labels("assembly").observe(result.seconds)
        if self.versions.rejection(version_id) is not None:
            self._failed = frozenset(manifest.expert_ids)  # not again until the set changes
            log.info("version %s was rejected before; it stays so", version_id)
            return
        started = time.perf_counter()
        if not (self.versions.folder(version_id) / USAGE_FILE).is_file():
            log.info("version %s usage check started", version_id)
        usage = self.checks.usage(self.store.layout, version_id,
                                  cancel=self._stopping.is_set)  # read back when done before
        checked = time.perf_counter() - started
        metrics.STAGE_SECONDS.labels("check").observe(checked)
        log.info("version %s usage check: %.1f s", version_id, checked)
        current = self.versions.current_id()
        verdict = judge(manifest, usage, self.versions.manifest(current) if current else None)
        evaluation = None
        if verdict.live and self.evaluator is not None:
            evaluation, verdict = self._evaluation_verdict(version_id)
        if not verdict.live:
            metrics.VERSIONS_MADE.labels("rejected").inc()
            self._reject(manifest, verdict)
            return
        before = set(self.versions.manifest(current).expert_ids) if current else set()
        self.versions.set_current(version_id)
        metrics.VERSIONS_MADE.labels("live").inc()
        now = time.time()
        for record in records:  # each expert's wait, the first time a version holds it
            if record.expert_id in set(manifest.expert_ids) - before:
                metrics.TO_LIVE_SECONDS.observe(now - float(record.created_at))
        self.last_error = None
        self.last_result = result
        accepted = max((float(r.created_at) for r in records
                        if r.expert_id in set(manifest.expert_ids)), default=time.time())
        log.info("version %s is current, %.1f s after its newest expert was accepted",
                 version_id, time.time() - accepted)
        if self.tracker is not None:
            record_version(manifest, self.versions, self.tracker, usage)
            if evaluation is not None:
                self.tracker.record_evaluation(evaluation)

    def _evaluation_verdict(self, version_id: str) -> tuple[dict | None, Verdict]:
        """With an evaluation config, a version goes live only if its mean accuracy is
        within max_drop of the champion's (coordinator.versions.promotion's rule). A drop
        names no expert: it may be the noise of a small evaluation."""
        started = time.perf_counter()
        try:
            record = self.evaluator.evaluate_now(version_id)
        except GaggleError as err:
            return None, Verdict(False, f"its evaluation failed: {str(err)[:200]}")
        metrics.STAGE_SECONDS.labels("evaluation").observe(time.perf_counter() - started)
        log.info("version %s evaluation: mean accuracy %.4f, %.1f s", version_id,
                 record["metrics"][MEAN], time.perf_counter() - started)
        try:
            check_not_worse(self.store.root, version_id, self.versions.champion_id(),
                            max_drop=self.evaluator.config.max_drop)
        except FailedPrecondition as err:
            return record, Verdict(False, str(err).split(": pass --force")[0])
        return record, Verdict(True)

    def _reject(self, manifest: VersionManifest, verdict: Verdict) -> None:
        """Record the rejection, quarantine the experts it names, and ask for the version
        without them; a rejection that names nobody waits for the expert set to change."""
        version_id = manifest.version_id
        record = self.versions.reject(version_id, verdict.reason, list(verdict.culprits))
        for expert_id, why in verdict.culprits.items():
            self.store.quarantine(expert_id, why, version_id)
        self.last_error = f"version {version_id} rejected: {verdict.reason}"
        log.error("version %s rejected, %s stays current: %s%s", version_id,
                  self.versions.current_id(), verdict.reason,
                  f"; quarantined {len(verdict.culprits)} expert(s)" if verdict.culprits
                  else "")
        if self.tracker is not None:
            self.tracker.record_rejection(rejection_payload(manifest, record))
        if verdict.culprits:
            self.request()
        else:
            self._failed = frozenset(manifest.expert_ids)

    def _assemble(self, records: list) -> AssemblyResult:
        base = self.store.cached_base_spec()
        return assemble(self.store, records, self.config,
                        base.fingerprint if base else None, base.name if base else None,
                        make_current=False, stop=self._stopping.is_set)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no assembly is running or wanted (True), or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 120.0) -> None:
        """Stop the threads, waiting at most `timeout` seconds in all.

        An assembly in flight stops at its next step (its Ray tasks are cancelled, its
        usage check stops between two layers) and its thread ends; a version not yet checked
        is not current, so the next start checks it and makes it current. Tracking calls wait
        in their on-disk queue, so nothing is lost. `alive()` says whether a thread outlived
        the timeout.
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        with self._lock:
            self._stop = True
        self._wanted.set()
        if self.evaluator is not None:  # before the tracker: it queues into the tracker
            self.evaluator.close(_left(deadline))
        if self._thread is not None:
            self._thread.join(timeout=_left(deadline))
        self.checks.close()
        if self.tracker is not None:
            self.tracker.close(_left(deadline))

    def alive(self) -> list[str]:
        """Names of this assembler's threads still running (after `close`: none, normally)."""
        threads = [self._thread, getattr(self.tracker, "_thread", None),
                   getattr(self.evaluator, "_thread", None)]
        return [t.name for t in threads if t is not None and t.is_alive()]


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def start_assembler(store: Store, *, tracking_uri: str | None = None,
                    ray_address: str | None = None, tracking: bool = True,
                    eval_config: EvaluationConfig | None = None, base: str | None = None,
                    ray_resources: tuple[str, ...] = ()) -> Assembler:
    """The started assembler of a serving coordinator; pass `.on_accepted` as the server's
    hook and `close()` it when the server stops.

    store: a handle of its own on the coordinator's store (the server's is closed first).
    tracking_uri: MLflow server (default: the SQLite store inside the store folder);
    tracking=False turns MLflow off. eval_config: each new version is then evaluated. base:
    the coordinator's base model name, which evaluation loads (default: the store's).
    ray_resources: NAME=AMOUNT custom resources that pin assembly and evaluation to nodes.
    """
    config = AssemblyConfig(ray_address=ray_address, resources=parse_resources(ray_resources))
    tracker = Tracker(store.root, tracking_uri) if tracking else None
    if tracker is not None:  # operator commands on this store track into the same MLflow
        record_tracking_uri(store.layout, tracker.uri)
    evaluator = None
    if eval_config is not None:
        if base is None and store.cached_base_spec() is not None:
            base = store.cached_base_spec().name
        evaluator = Evaluator(store.root, eval_config, tracker=tracker, ray_config=config,
                              base=base)
    return Assembler(store, config=config, tracker=tracker, evaluator=evaluator).start()
