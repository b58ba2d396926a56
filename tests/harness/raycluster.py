"""A real two-node Ray cluster of separate processes on 127.0.0.1, for tests and benchmarks.

The head (`ray start --head`, no CPUs, so it runs none of the work) serves the GCS and Ray
Client; the worker node (`ray start --address`) carries every CPU and a custom resource and
runs in its own mount namespace where a `hidden` folder is covered by an empty tmpfs: whatever
the coordinator keeps there (its store) does not exist for the worker's processes.

The nodes use 127.0.0.2, a loopback address: `ray start --address` refuses to run with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it on Ray replaces 127.0.0.1 (never 127.0.0.2)
by the machine's outward address. Every address Ray advertises and connects to stays on
loopback; Ray's GCS and raylets still listen on all interfaces, as they do for any node address
but exactly 127.0.0.1.

Both nodes are `ray start --block` processes in their own sessions; `stop()` ends them by
their PIDs and then any process of their sessions or of this cluster's temp dir that is left,
never another cluster's Ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo.processes import free_port

HOST = "127.0.0.2"
RESOURCE = "gaggle_worker"  # the worker node's custom resource


def can_hide_folders() -> str | None:
    """None when this machine lets us run a process in a private mount namespace, else why."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs gaggle-probe /mnt"], capture_output=True)
    if probe.returncode != 0:
        return ("private mount namespaces need root (or CAP_SYS_ADMIN): "
                f"{probe.stderr.decode(errors='replace').strip()[:200]}")
    return None


class LocalCluster:
    """Head plus one worker node; `address` and `client_address` are how drivers join."""

    def __init__(self, hidden: Path, *, worker_cpus: int = 2, resource_units: int = 8) -> None:
        self.hidden = hidden
        self.worker_cpus = worker_cpus
        self.resource_units = resource_units
        # Short: Ray's unix sockets live under it, and their paths are limited to 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))
        self.port = free_port()
        self.client_port = free_port()
        self.processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://{HOST}:{self.client_port}"

    def start(self, timeout: float = 120.0) -> LocalCluster:
        ray = str(Path(sys.executable).with_name("ray"))
        common = [f"--node-ip-address={HOST}", "--disable-usage-stats",
                  f"--temp-dir={self.temp_dir}", "--block"]
        head = [ray, "start", "--head", f"--port={self.port}", "--num-cpus=0",
                f"--ray-client-server-port={self.client_port}", "--include-dashboard=false",
                *common]
        self._launch("head", head)
        self._wait_started("head", timeout)
        worker = " ".join([ray, "start", f"--address={self.address}",
                           f"--num-cpus={self.worker_cpus}",
                           f"--resources='{{\"{RESOURCE}\": {self.resource_units}}}'",
                           *common])
        self.hidden.mkdir(parents=True, exist_ok=True)
        self._launch("worker", ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount -t tmpfs gaggle-hidden {self.hidden} && exec {worker}"])
        self._wait_started("worker", timeout)
        return self

    def _launch(self, name: str, argv: list[str], cluster_mode: str = "1") -> None:
        # Cluster mode off keeps a node's own address lookups on loopback; `ray start
        # --address` refuses to run without it, and --node-ip-address keeps it on loopback.
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": cluster_mode,
               "RAY_AUTH_MODE": "disabled"}
        with open(self.temp_dir / f"{name}.log", "ab") as log:
            self.processes.append(subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                cwd=self.temp_dir))

    def _wait_started(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log(name):
                return
            if self.processes[-1].poll() is not None:
                break
            time.sleep(0.3)
        text = self.log(name)
        self.stop()
        raise RuntimeError(f"Ray {name} node did not start:\n{text[-3000:]}")

    def log(self, name: str) -> str:
        path = self.temp_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def server_logs(self, pattern: str = "ray_client_server*") -> str:
        """The tails of the head's Ray log files matching `pattern` (for failure messages)."""
        logs = sorted((self.temp_dir / "session_latest" / "logs").glob(pattern))
        return "\n".join(f"{p.name}: {p.read_text(errors='replace')[-1500:]}" for p in logs)

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node's processes), then SIGKILL
        whatever of this cluster is left: its sessions' processes, and processes naming its
        temp dir (Ray workers may leave their session)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pid in self._leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.processes = []
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _leftovers(self) -> list[int]:
        sessions = {p.pid for p in self.processes}
        marker = str(self.temp_dir).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                in_session = os.getsid(int(entry.name)) in sessions
            except (OSError, ProcessLookupError):
                continue
            if in_session or marker in cmdline:
                found.append(int(entry.name))
        return found
