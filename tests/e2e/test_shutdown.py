"""SIGTERM to a real `serve` process with an assembly or its check in flight: it exits 0
within the 10 s that `docker stop` allows, never aborting, and the interrupted version is made
when the coordinator starts again.

The assembly is held in flight by asking Ray for a custom resource no node has: its tasks
wait for capacity, as they would on a busy cluster, for as long as the test needs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from coordinator.store.versions import VersionStore
from routing.base import load_base
from routing.synthetic import random_bundle
from tests.harness.servers import start_coordinator
from tests.harness.stores import add_expert, commit, make_store

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


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Ray's GCS, raylet and workers of a local Ray)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_during_the_check_of_real_size_experts_stops_cleanly(tmp_path):
    """SmolLM2 with two rank-16 experts on every linear: SIGTERM while the usage check's
    routed forward runs in the assembler thread. The process exits 0 within 10 s with no
    abort and no traceback, its Ray goes with it, and the next start makes the version."""
    spec = load_base("smollm2-135m").spec()  # also caches the converted model for serve
    root = tmp_path / "store"
    store = make_store(root, spec)
    ids = [commit(store, random_bundle(spec, f"e{i}", rank=16, seed=i, scale=0.01,
                                       with_activations=True)).expert_id for i in range(2)]
    store.close()
    server = start_coordinator(root, base="smollm2-135m", extra_args=OFFLINE_MLFLOW)
    wait_for_log(server, "usage check started", 240)
    time.sleep(1.0)  # the base is loaded and the routed forward under way
    family = _descendants(server.pid)
    assert family, "a local Ray runs below the coordinator"
    started = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    try:
        code = server.process.wait(30)
    finally:
        server.kill()
    seconds = time.monotonic() - started
    log = server.log()
    assert seconds < 10 and code == 0, f"exit {code} after {seconds:.1f} s:\n{log[-3000:]}"
    assert "abandoned and made again on start" in log
    assert "Aborted" not in log and "Traceback" not in log, log[-3000:]
    time.sleep(2.0)  # Ray's processes are told to stop as the driver shuts it down
    assert not [pid for pid in family if _alive(pid)], "Ray processes outlived serve"
    assert VersionStore(root).current_id() is None  # an unchecked version never went live

    server = start_coordinator(root, base="smollm2-135m", extra_args=OFFLINE_MLFLOW)
    try:
        deadline = time.monotonic() + 240
        while VersionStore(root).current_id() is None:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.5)
        assert sorted(VersionStore(root).manifest(VersionStore(root).current_id())
                      .expert_ids) == sorted(ids)
    finally:
        assert server.stop() == 0, server.log()[-3000:]
