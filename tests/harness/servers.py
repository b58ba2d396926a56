"""Real server processes for tests: start a coordinator on a free loopback port, stop it by PID.

Usage::

    server = start_coordinator(tmp_path / "store")           # waits for health SERVING
    token = add_token(server.store, "alice")
    ... grpc calls to server.address ...
    server.stop()                                           # SIGTERM, then SIGKILL

`seed_base_spec(store, spec)` writes the base model's cached spec first, so the server skips
loading the model (seconds per start) when a test does not need that path. A coordinator
assembles a router version (Ray, MLflow) after each accepted expert; tests of storage alone
pass `extra_args=("--no-assembly",)`.

Any other long-running command (a README command as written, `mlflow ui`, `mlflow models
serve`) starts with `start_command(argv, ready=lambda: http_ok(url), log_path=...)` on a
`free_port()`, and `stop()` ends it by its PID, then whatever of its process group is left.
`MlflowServer(root).start()` runs `mlflow server` (SQLite, or a given backend URI) the same way.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.processes import free_port, http_ok

ROOT = Path(__file__).resolve().parents[2]
_READY_RE = re.compile(r"gaggle-coordinator serving on [^\s:]+:(\d+)")


@dataclass
class ServerProcess:
    """A coordinator started by `start_coordinator`."""

    process: subprocess.Popen
    port: int
    store: Path
    log_path: Path
    args: list[str] = field(default_factory=list)  # the serve arguments, for restarts
    credentials: grpc.ChannelCredentials | None = None  # TLS, when the server uses it

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful), SIGKILL if it does not exit in time; the exit code."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a crash."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait()


def start_coordinator(store: Path, *, base: str = "tiny-llama", port: int = 0,
                      extra_args: tuple[str, ...] = (), timeout: float = 120.0,
                      credentials: grpc.ChannelCredentials | None = None,
                      log_path: Path | None = None) -> ServerProcess:
    """Start `gaggle-coordinator serve` and wait until its health check answers SERVING."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    args = ["--store", str(store), "--base", base, "--host", "127.0.0.1", *extra_args]
    log_path = log_path or store.parent / f"{store.name}-coordinator.log"
    return _launch(args, port, store, log_path, credentials, timeout)


def restart(server: ServerProcess, timeout: float = 120.0) -> ServerProcess:
    """Start the same coordinator again on the same port (after stop or kill)."""
    return _launch(server.args, server.port, server.store, server.log_path,
                   server.credentials, timeout)


def _launch(args: list[str], port: int, store: Path, log_path: Path,
            credentials: grpc.ChannelCredentials | None, timeout: float) -> ServerProcess:
    # in characters, as log() returns them (a byte count would skip past multi-byte ones)
    offset = len(log_path.read_text(errors="replace")) if log_path.exists() else 0
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", *args, "--port", str(port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ServerProcess(process, port, store, log_path, args, credentials)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"coordinator exited with {process.returncode}:\n"
                               f"{server.log()[offset:]}")
        match = _READY_RE.search(server.log()[offset:])
        if match:
            server.port = int(match.group(1))
            wait_serving(server, deadline - time.monotonic())
            return server
        time.sleep(0.1)
    server.kill()
    raise TimeoutError(f"coordinator did not start in {timeout} s:\n{server.log()[offset:]}")


def wait_serving(server: ServerProcess, timeout: float = 30.0) -> None:
    """Poll the standard health service until it answers SERVING."""
    deadline = time.monotonic() + timeout
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.address} is not SERVING after {timeout} s")
            time.sleep(0.1)


def add_token(store: Path, name: str) -> str:
    """Issue a contributor token directly in the store's index (as `token add` does)."""
    from coordinator.service.auth import TokenBook
    from coordinator.store.experts import Store

    store_handle = Store(store)
    try:
        return TokenBook(store_handle).add(name, rotate=True)  # a new name, or one more token
    finally:
        store_handle.close()


def seed_base_spec(store: Path, spec) -> None:
    """Cache the base model's spec in a store, so the server need not load the model."""
    from coordinator.store.experts import Store

    store_handle = Store(store)
    try:
        store_handle.cache_base_spec(spec)
    finally:
        store_handle.close()


# ----- any long-running command (a README command, `mlflow ui`, `mlflow models serve`) -----

@dataclass
class CommandProcess:
    """A command started by `launch_command`, leading its own session (process group), so the
    workers it spawns (uvicorn, Ray) are reached through its PID's group when it is stopped."""

    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, ready: Callable[[], bool], timeout: float = 120.0,
                   what: str = "command") -> None:
        """Poll `ready` until it holds; fail early, with the log, if the command exits first,
        and stop it if it is not ready in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _end_group(self.pid)
                raise RuntimeError(f"{what} exited with {self.process.returncode} before it was "
                                   f"ready:\n{self.log()[-3000:]}")
            if ready():
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{what} was not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def terminate(self) -> None:
        """SIGTERM now, without waiting: it shuts down while other work goes on; a later
        `stop()` collects it."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM to the command (graceful), SIGKILL if it does not exit in time; then end
        whatever of its group outlived it. Returns the command's exit code."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        code = self.process.wait()
        _end_group(self.pid)
        return code


def _group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _end_group(pgid: int, grace: float = 5.0) -> None:
    """Let what is left of a process group we started exit on its own, then SIGTERM it, then
    SIGKILL it, `grace` seconds apart."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def launch_command(argv: list[str], *, log_path: Path, cwd: Path | None = None,
                   env: dict[str, str] | None = None) -> CommandProcess:
    """Start `argv` in its own session, its output appended to `log_path`; do not wait."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return CommandProcess(process, log_path)


def start_command(argv: list[str], *, ready: Callable[[], bool], log_path: Path,
                  cwd: Path | None = None, env: dict[str, str] | None = None,
                  timeout: float = 120.0, what: str = "command") -> CommandProcess:
    """`launch_command`, then `wait_ready` (the command is stopped if it never gets ready)."""
    started = launch_command(argv, log_path=log_path, cwd=cwd, env=env)
    started.wait_ready(ready, timeout, what)
    return started


def wait_for(condition: Callable[[], object], timeout: float, what: str):
    """Poll `condition()` every 0.5 s until it returns something truthy, and return that;
    TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"no {what} after {timeout} s")


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
            if http_ok(f"{self.uri}/health"):
                return
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
