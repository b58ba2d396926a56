"""The usage check in a child process of the coordinator, which keeps the base model loaded.

The check routes the base model with a whole version: the base's weights, every expert's keys
and a page pool of adapters. In a child process that memory is not the coordinator's (whose
own stays flat as the federation grows), and stopping a check is ending a process: no thread
of the coordinator is ever inside native code when it exits. The child reads the version from
the store on this machine (coordinator.checks.usage.version_usage) and writes its report there
as the coordinator would; it is started on first use and kept for the next versions.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import asdict

from coordinator.checks.usage import UsageConfig
from coordinator.store.layout import Layout
from routing.layers import Cancelled

log = logging.getLogger(__name__)
_POLL_S = 0.2


class CheckProcess:
    """One child process running usage checks, one at a time."""

    def __init__(self, placement: dict[str, str] | None = None) -> None:
        """placement: the serving device and dtype the child loads the base with
        (routing.device.serving_placement), by default this process's."""
        from routing.device import serving_placement

        self.placement = placement or serving_placement()
        self._process = None
        self._conn = None
        self._lock = threading.Lock()

    def usage(self, store: Layout, version_id: str, config: UsageConfig | None = None,
              cancel: Callable[[], bool] | None = None) -> dict:
        """The version's usage report (coordinator.checks.usage.version_usage), measured in
        the child. Raises Cancelled when `cancel` turns true (the child is stopped); a child
        that dies gives {"error": ...}, and the next check starts a new one."""
        with self._lock:
            self._start()
            self._conn.send((str(Layout.of(store).root), version_id,
                             asdict(config or UsageConfig())))
            while not self._conn.poll(_POLL_S):
                if cancel is not None and cancel():
                    self._stop()
                    raise Cancelled(f"the usage check of version {version_id} was stopped")
                if not self._process.is_alive():
                    code = self._process.exitcode
                    self._stop()
                    return {"error": f"the check process ended with exit code {code}"}
            try:
                return self._conn.recv()
            except EOFError:
                self._stop()
                return {"error": "the check process ended without a report"}

    def _start(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        context = multiprocessing.get_context("spawn")  # no copy of this process's threads
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.placement),
                                        name="gaggle-usage-check", daemon=True)
        self._process.start()
        child.close()

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def close(self) -> None:
        """End the child (a check in flight stops with it)."""
        with self._lock:
            self._stop()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid


def _serve(conn, placement: dict[str, str]) -> None:
    """The child: answer each (store, version, config) with its usage report."""
    from coordinator.checks.usage import version_usage
    from coordinator.store.versions import VersionStore
    from routing.device import set_serving_placement

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_serving_placement(placement.get("device", "auto"), placement.get("dtype", "auto"))
    while True:
        try:
            root, version_id, config = conn.recv()
        except (EOFError, KeyboardInterrupt):
            os._exit(0)
        report = version_usage(VersionStore(root), version_id, UsageConfig(**config))
        conn.send(report)
