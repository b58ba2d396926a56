"""The scheduler behind the server's `on_accepted` hook: at most one assembly in flight, in a
background thread; experts accepted meanwhile go into the next assembly.

The hook only appends to a list and sets an event, so an upload RPC never waits for Ray or
MLflow. Tracking calls go through `Tracker`'s on-disk queue and its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from coordinator.assemble import AssemblyConfig, AssemblyResult, assemble, select_experts
from coordinator.tracking import Tracker, expert_payload, version_payload
from coordinator.version_store import VersionStore
from protocol.errors import GaggleError

log = logging.getLogger(__name__)


class Assembler:
    """Owns the assembly thread of a serving coordinator (and its tracker, when given)."""

    def __init__(self, store, *, config: AssemblyConfig | None = None,
                 tracker: Tracker | None = None) -> None:
        """store: the serving coordinator's `coordinator.store.Store`."""
        self.store = store
        self.root = Path(store.root)
        self.config = config or AssemblyConfig()
        self.tracker = tracker
        self.versions = VersionStore(self.root)
        self.last_result: AssemblyResult | None = None
        self.last_error: str | None = None
        self.assemblies = 0  # finished attempts, successful or not
        self._accepted: list = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._busy = False
        self._stop = False
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
        """Start the thread; catch up on experts accepted while no assembler ran."""
        if self._thread is None:
            if self.tracker is not None:
                self.tracker.start()
            self._catch_up()
            self._thread = threading.Thread(target=self._loop, name="gaggle-assembler",
                                            daemon=True)
            self._thread.start()
        return self

    def _catch_up(self) -> None:
        """Queue runs of stored experts never tracked, and assemble if CURRENT is stale."""
        records = self.store.list_experts()
        if self.tracker is not None:
            for record in records:
                if not self.tracker.queue.has(f"expert:{record.expert_id}"):
                    self.tracker.record_expert(expert_payload(record))
        current = self.versions.current_id()
        wanted = {e.expert_id for e in select_experts(records)}
        have = ({e["expert_id"] for e in self.versions.manifest(current)["experts"]}
                if current else set())
        if records and wanted != have:
            self.request()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            with self._lock:
                if self._stop:
                    return
                self._wanted.clear()
                accepted, self._accepted = self._accepted, []
            self._run_once(accepted)
            with self._lock:
                if not self._wanted.is_set():
                    self._busy = False
                    self._idle.notify_all()

    def _run_once(self, accepted: list) -> None:
        try:
            if self.tracker is not None:
                for record in accepted:
                    self.tracker.record_expert(expert_payload(record))
            result = self._assemble()
        except GaggleError as err:
            self.last_error = str(err)
            log.error("assembly failed, version %s stays current: %s",
                      self.versions.current_id(), err)
        except Exception as err:  # a bug must not kill the thread that serves later experts
            self.last_error = f"{type(err).__name__}: {err}"
            log.exception("assembly failed, version %s stays current",
                          self.versions.current_id())
        else:
            self.last_error = None
            self.last_result = result
            if result.created and self.tracker is not None:
                folder = self.versions.folder(result.version_id)
                self.tracker.record_version(version_payload(result.manifest, folder))
            log.info("version %s: %d experts (%s), %.1f s", result.version_id,
                     len(result.manifest["experts"]), result.manifest.get("diff", ""),
                     result.seconds)
        finally:
            self.assemblies += 1

    def _assemble(self) -> AssemblyResult:
        base = self.store.cached_base_spec()
        return assemble(self.root, self.store.list_experts(), self.config,
                        base.fingerprint if base else None)

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

    def close(self) -> None:
        """Stop after the assembly in flight; then stop the tracker's thread."""
        with self._lock:
            self._stop = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
            self._thread = None
        if self.tracker is not None:
            self.tracker.close()


def start_assembler(store, *, tracking_uri: str | None = None, ray_address: str | None = None,
                    tracking: bool = True) -> Assembler:
    """The assembler a serving coordinator runs; pass `.on_accepted` as the server's hook.

    store: the server's `coordinator.store.Store`. tracking_uri: MLflow server (default: the
    SQLite store inside the store folder); tracking=False turns MLflow off.
    """
    config = AssemblyConfig(ray_address=ray_address)
    tracker = Tracker(store.root, tracking_uri) if tracking else None
    return Assembler(store, config=config, tracker=tracker).start()
