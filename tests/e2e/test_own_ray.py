"""A coordinator started without --ray-address runs its own local Ray, whatever else runs on
the machine: here a Ray head started by `ray start` (which leaves its address in
/tmp/ray/ray_current_cluster, where a plain `ray.init()` would look), and then that head's
pointer file after the head has stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contributor.client import Connection, CoordinatorClient
from demo.processes import free_port
from protocol.bundle import save_bundle
from routing.synthetic import random_bundle
from tests.harness.servers import add_token, seed_base_spec, start_coordinator

POINTER = Path("/tmp/ray/ray_current_cluster")  # Ray's default temp dir: what ray.init reads
OFFLINE_MLFLOW = ("--tracking-uri", "http://127.0.0.1:9")  # tracking calls queue on disk


@pytest.fixture
def pointer_kept():
    """Put back whatever pointer file was there before the test (another cluster's)."""
    before = POINTER.read_text() if POINTER.is_file() else None
    yield
    if before is None:
        POINTER.unlink(missing_ok=True)
    else:
        POINTER.write_text(before)


def start_head(log: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on its own ports, in its own session (stopped by its PID)."""
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    with open(log, "ab") as out:
        head = subprocess.Popen(
            [ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--block",
             "--include-dashboard=false", "--disable-usage-stats",
             "--node-ip-address=127.0.0.1", f"--ray-client-server-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "RAY_AUTH_MODE": "disabled"})
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.3)
    return head, f"127.0.0.1:{port}"


def stop_head(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def submit_and_wait_for_a_version(tmp_path: Path, tiny_spec, name: str, seed: int) -> None:
    store = tmp_path / "store"
    seed_base_spec(store, tiny_spec)
    token = add_token(store, "alice")
    server = start_coordinator(store, extra_args=OFFLINE_MLFLOW,
                               log_path=tmp_path / f"serve-{name}.log")
    try:
        bundle = save_bundle(random_bundle(tiny_spec, name, seed=seed), tmp_path / name)
        with CoordinatorClient(Connection(server.address, token)) as client:
            expert_id = client.submit(bundle).expert_id
        deadline = time.monotonic() + 120
        while expert_id not in _current_experts(store):
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.3)
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert "num_cpus and num_gpus must not be provided" not in server.log()


def _current_experts(store: Path) -> set[str]:
    """The expert ids of the store's current version, read from its files alone."""
    versions = store / "versions"
    try:
        current = (versions / "CURRENT").read_text().strip()
        manifest = json.loads((versions / current / "version.json").read_text())
    except (OSError, ValueError):
        return set()
    return {e["expert_id"] for e in manifest["experts"]}


@pytest.mark.usefixtures("pointer_kept")
def test_serve_runs_its_own_ray_beside_a_ray_start_cluster_and_after_it(tmp_path, tiny_spec):
    head, address = start_head(tmp_path / "head.log")
    try:
        assert POINTER.read_text().strip() == address  # where a plain ray.init() would go
        submit_and_wait_for_a_version(tmp_path, tiny_spec, "first", 1)
    finally:
        stop_head(head)
    assert POINTER.is_file()  # the stopped head's pointer stays behind
    submit_and_wait_for_a_version(tmp_path, tiny_spec, "second", 2)
