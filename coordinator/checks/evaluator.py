"""The evaluation thread of a serving coordinator: versions are evaluated one after another,
off the assembly thread, so neither uploads nor the next assembly wait for an evaluation."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from coordinator.checks.evaluation import (
    EvalPool,
    EvaluationConfig,
    evaluate_version,
    needs_evaluation,
    save_active_config,
)
from coordinator.ray_cluster import RayConfig
from coordinator.store.versions import VersionStore
from protocol.errors import GaggleError, InvalidArgument, Unavailable

log = logging.getLogger(__name__)


class Evaluator:
    """Owns the evaluation actors and a FIFO of version ids to evaluate."""

    def __init__(self, store_root: str | os.PathLike, config: EvaluationConfig, *,
                 tracker=None, ray_config: RayConfig | None = None,
                 pool: EvalPool | None = None, base: str | None = None) -> None:
        """tracker: the assembler's `coordinator.tracking.tracker.Tracker`, or None (local only).
        pool: actors to share (their config must be `config`); default: this evaluator's.
        base: the coordinator's base model name; its actors start loading it at once
        (default: each version's declared base, loaded on the first evaluation)."""
        self.root = Path(store_root)
        self.config = config
        self.tracker = tracker
        self.base = base
        if pool is not None and pool.config != config:
            raise InvalidArgument("the shared evaluation pool runs another config than this "
                                  "evaluator's: give both the same EvaluationConfig",
                                  field="eval_config")
        self.pool = pool or EvalPool(config, ray_config)
        self._own_pool = pool is None
        self.versions = VersionStore(self.root)
        self.evaluated = 0  # versions evaluated by this process
        self.last_error: str | None = None
        self._queue: deque[str] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._stop = False
        self._thread: threading.Thread | None = None

    def submit(self, version_id: str) -> None:
        """Queue a version (returns at once); one already evaluated under this config is
        skipped when its turn comes."""
        with self._cond:
            if version_id not in self._queue:
                self._queue.append(version_id)
            self._cond.notify_all()

    def start(self) -> Evaluator:
        """Record the active config (promote reads its threshold) and start the thread; the
        champion and the current version are evaluated first if this config never saw them."""
        if self._thread is None:
            save_active_config(self.root, self.config)
            for version_id in (self.versions.champion_id(), self.versions.current_id()):
                if version_id:
                    self.submit(version_id)
            self._thread = threading.Thread(target=self._loop, name="gaggle-evaluator",
                                            daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        if self.base is not None:
            try:  # the actors load the model while the first experts arrive
                self.pool.start(self.base)
            except Exception:
                log.exception("evaluation actors did not start; the first version retries")
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                version_id = self._queue.popleft()
                self._running = True
            try:
                self._evaluate(version_id)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def _evaluate(self, version_id: str) -> None:
        if not needs_evaluation(self.root, version_id, self.config):
            return
        try:
            record = evaluate_version(self.root, version_id, self.pool, self.tracker,
                                      base=self.base)
        except Exception as err:  # the version stays without metrics; the thread goes on
            self.last_error = f"{type(err).__name__}: {err}"
            if self._stop:  # its actors were stopped under it
                log.info("stopping: the evaluation of version %s is abandoned", version_id)
                return
            log.exception("evaluation of version %s failed; it stays without metrics",
                          version_id)
            return
        self.last_error = None
        self.evaluated += 1
        log.info("version %s evaluated: mean accuracy %.4f on %d tasks, %.1f s", version_id,
                 record["metrics"]["accuracy"], len(self.config.tasks), record["seconds"])

    def evaluate_now(self, version_id: str) -> dict:
        """Evaluate a version in the calling thread (its record is written; the caller
        queues its tracking once the version is tracked). Raises GaggleError on failure
        (Unavailable when the actors were stopped under it)."""
        try:
            return evaluate_version(self.root, version_id, self.pool, None, base=self.base)
        except GaggleError:
            raise
        except Exception as err:  # Ray failures below the pool's own mapping
            raise Unavailable(f"evaluation of version {version_id} failed: "
                              f"{type(err).__name__}: {err}") from None

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (True), or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking versions and free the actors, which ends an evaluation in flight (its
        version stays without metrics and is evaluated on the next start); wait up to
        `timeout` for the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._own_pool:
            self.pool.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
