"""Starting and stopping the local federation's processes by PID, on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """The environment every child gets: Ray kept on loopback, unbuffered output."""
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               PYTHONUNBUFFERED="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return env


def wait_until(ready: Callable[[], bool], timeout: float, what: str,
               process: subprocess.Popen | None = None, interval: float = 0.25) -> None:
    """Poll `ready` until it holds; fail early if `process` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was "
                               "ready; see its log")
        if ready():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} was not ready after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@dataclass
class ProcessGroup:
    """Children started by one program; `stop_all` ends each by its own PID, newest first."""

    log_dir: Path
    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    started: list[int] = field(default_factory=list)  # every PID, also written to pids.json

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env or loopback_env(),
                                   start_new_session=True)
        log.close()
        self.children.append((name, process))
        self.started.append(process.pid)
        (self.log_dir / "pids.json").write_text(json.dumps(self.started))
        return process

    def stop_all(self, grace: float = 10.0) -> None:
        for _, process in reversed(self.children):
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, process in reversed(self.children):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        self.children.clear()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    # Each child leads its own session (start_new_session), so its own workers (MLflow's
    # gunicorn, Ray's raylets) are reached through its process group, still by its PID.
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def start_mlflow(group: ProcessGroup, root: Path, port: int) -> str:
    """A lean MLflow tracking server (SQLite, one worker) on loopback; returns its URI."""
    root.mkdir(parents=True, exist_ok=True)
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    process = group.start("mlflow", [
        mlflow, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--host", LOOPBACK,
        "--port", str(port), "--workers", "1",
    ])
    uri = f"http://{LOOPBACK}:{port}"
    wait_until(lambda: http_ok(f"{uri}/health"), 120, "the MLflow server", process)
    return uri


def run(argv: list[str], log: Path, timeout: float | None = None) -> str:
    """Run a command to completion, logging its output; return stdout or raise with its tail."""
    result = subprocess.run(argv, capture_output=True, text=True, env=loopback_env(),
                            timeout=timeout, stdin=subprocess.DEVNULL)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(argv[:3])} failed (exit {result.returncode}): "
                           + " | ".join(tail))
    return result.stdout
