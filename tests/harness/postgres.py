"""A throwaway PostgreSQL server for tests: `initdb` and `pg_ctl` (Debian's `postgresql`
package) on a temp folder and a free 127.0.0.1 port, stopped by `pg_ctl stop`.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user the
package creates, in a folder that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from demo.processes import free_port

INSTALL_HINT = ("PostgreSQL is not installed: `apt-get install -y postgresql` (Debian) puts "
                "initdb and pg_ctl under /usr/lib/postgresql/<version>/bin; .ci/run installs it")


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # the real folder: createdb lives there too
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


def unavailable() -> str | None:
    """None when a server can be started here, else why not (a skip reason)."""
    if postgres_bin() is None:
        return INSTALL_HINT
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user to run PostgreSQL as"
    return None


class PostgresServer:
    """One PostgreSQL cluster holding database `mlflow`; `uri` is SQLAlchemy's URL for it."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        # Not under pytest's 0700 temp folders: the `postgres` user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="gaggle-pg-"))
        self.user = "postgres" if os.geteuid() == 0 else None

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://gaggle@127.0.0.1:{self.port}/mlflow"

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bin / tool), *args]
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    def start(self) -> PostgresServer:
        if self.user:
            shutil.chown(self.root, self.user)
        data, log = self.root / "data", self.root / "server.log"
        try:
            self._run("initdb", "-D", str(data), "-U", "gaggle", "--auth=trust", "-E", "UTF8")
            self._run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                      f"-h 127.0.0.1 -p {self.port} -k {self.root}", "start")
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "gaggle",
                      "mlflow")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
