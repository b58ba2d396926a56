"""Helpers for the assembly, tracking and version tests: a store filled with synthetic experts,
a real `mlflow server` process on a free loopback port, and the process's local Ray."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from coordinator.store.experts import ExpertRecord, Store
from protocol.archive import pack_bundle_bytes
from protocol.bundle import BaseSpec, Bundle, save_bundle
from routing.synthetic import random_bundle


def make_store(root: Path, spec: BaseSpec) -> Store:
    """An empty coordinator store for the tiny base model."""
    store = Store(root)
    store.cache_base_spec(spec)
    return store


def commit(store: Store, bundle: Bundle, contributor: str = "alice") -> ExpertRecord:
    """Store a bundle the way an accepted upload is stored: staged folder, then commit."""
    staged = store.staging_dir / f"test-{bundle.name}-{time.monotonic_ns()}"
    save_bundle(bundle, staged)
    archive = pack_bundle_bytes(staged)
    return store.commit_expert(bundle, staged, contributor=contributor,
                               size_bytes=len(archive), upload_id="test-upload")


def add_expert(store: Store, spec: BaseSpec, name: str, seed: int, *, method: str = "lora",
               contributor: str = "alice", losses: list[float] | None = None) -> ExpertRecord:
    """A seeded random expert, with a training summary like a contributor's."""
    bundle = random_bundle(spec, name, method=method, seed=seed)
    now = round(time.time(), 3)
    bundle.manifest.training = {"expert_steps": 6, "gate_steps": 4,
                                "expert_loss_curve": losses or [3.0 - 0.1 * seed, 2.0, 1.5],
                                "started_at": now - 600 - seed, "finished_at": now - 300}
    return commit(store, bundle, contributor)


@pytest.fixture(scope="session")
def ray_local():
    """The process's local Ray (started once, 2 CPUs, on loopback)."""
    from coordinator.ray_cluster import ensure_ray

    ensure_ray()
    yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend (or `backend_uri`, say a
    PostgreSQL database); stopped and restarted by PID."""

    def __init__(self, root: Path, backend_uri: str | None = None) -> None:
        self.root = root
        self.backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting (it takes seconds to answer)."""
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [mlflow, "server", "--backend-store-uri", self.backend_uri,
                 "--artifacts-destination", str(self.root / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log_text = (self.root / "server.log").read_text()
                raise RuntimeError(f"mlflow server exited: {log_text}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server not ready in {timeout} s")

    def stop(self) -> None:
        """SIGTERM to the server (its workers follow); wait until the port is free."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the workers too
                self.process.wait()
        self.process = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
