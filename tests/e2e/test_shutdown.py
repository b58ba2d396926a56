"""SIGTERM to a real `serve` process with an assembly in flight: it exits within the 10 s that
`docker stop` allows, and the interrupted version is assembled when the coordinator starts
again.

The assembly is held in flight by asking Ray for a custom resource no node has: its tasks
wait for capacity, as they would on a busy cluster, for as long as the test needs.
"""

from __future__ import annotations

import os
import signal
import time

from coordinator.store.versions import VersionStore
from tests.harness.servers import start_coordinator
from tests.harness.stores import add_expert, make_store

OFFLINE_MLFLOW = ("--tracking-uri", "http://127.0.0.1:9")  # calls queue on disk


def wait_for_log(server, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{server.log()[-3000:]}"
        time.sleep(0.2)


def test_sigterm_mid_assembly_exits_in_time_and_the_version_is_made_on_restart(tmp_path,
                                                                              tiny_spec):
    root = tmp_path / "store"
    store = make_store(root, tiny_spec)
    for seed, name in enumerate(("a", "b", "c"), start=1):
        add_expert(store, tiny_spec, name, seed)
    store.close()
    server = start_coordinator(root, extra_args=(*OFFLINE_MLFLOW, "--ray-resource",
                                                 "gaggle_absent_node=1"))
    wait_for_log(server, "assembling a version of 3 experts", 120)
    time.sleep(1.0)  # the tasks are submitted and waiting for capacity
    started = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    try:
        code = server.process.wait(30)
    finally:
        server.kill()  # a no-op once it exited
    seconds = time.monotonic() - started
    assert seconds < 10, f"exit took {seconds:.1f} s:\n{server.log()[-3000:]}"
    assert code == 0, server.log()[-3000:]
    assert VersionStore(root).current_id() is None  # nothing half-written became current

    server = start_coordinator(root, extra_args=OFFLINE_MLFLOW)
    try:
        deadline = time.monotonic() + 120
        while VersionStore(root).current_id() is None:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.3)
        manifest = VersionStore(root).manifest(VersionStore(root).current_id())
        assert manifest.names == ["alice/a", "alice/b", "alice/c"]
    finally:
        server.stop()
