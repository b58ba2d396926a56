"""The durable queue of MLflow tracking calls: a SQLite table in the store, replayed in order.

Every tracking call is written here first and sent to MLflow later, so the coordinator keeps
accepting and assembling experts while MLflow is unreachable. Each operation has a stable id
(`expert:<id>`, `version:<id>`, ...): enqueueing the same operation twice is a no-op, and the
replay side checks MLflow for that id before acting, so every call lands exactly once.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

QUEUE_FILE = "queue.db"
LOCK_FILE = "replay.lock"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',  -- pending | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS expert_runs (
    uri TEXT NOT NULL,           -- the tracking URI the run lives at
    expert_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    artifacts TEXT NOT NULL DEFAULT '',  -- artifact folders logged so far, comma-separated
    PRIMARY KEY (uri, expert_id)
)
"""


@dataclass(frozen=True)
class Op:
    """One queued tracking call."""

    seq: int  # replay order
    op_id: str  # stable identity, also written to MLflow as a tag to detect a replay
    kind: str  # "expert_run", "router_version" or "promotion"
    payload: dict  # JSON arguments of the call


class OpQueue:
    """Append-only queue of tracking operations in `<folder>/queue.db`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / QUEUE_FILE
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            for statement in _SCHEMA.split(";"):
                db.execute(statement)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: the queue is used from the RPC hook, the assembler thread
        # and CLI processes, and sqlite3 connections must not cross threads.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def enqueue(self, op_id: str, kind: str, payload: dict) -> bool:
        """Append an operation; False when one with this id is already queued (or done)."""
        text = json.dumps(payload, sort_keys=True)
        with self._connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO ops (op_id, kind, payload, created_at) VALUES (?,?,?,?)",
                (op_id, kind, text, time.time()),
            )
            return cursor.rowcount == 1

    def pending(self) -> list[Op]:
        """Operations not yet replayed, in the order they were queued."""
        with self._connect() as db:
            rows = db.execute("SELECT seq, op_id, kind, payload FROM ops "
                              "WHERE state = 'pending' ORDER BY seq").fetchall()
        return [Op(seq, op_id, kind, json.loads(payload)) for seq, op_id, kind, payload in rows]

    def counts(self) -> dict[str, int]:
        """Number of operations per state."""
        with self._connect() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM ops GROUP BY state").fetchall()
        return {"pending": 0, "done": 0, "failed": 0} | dict(rows)

    def has(self, op_id: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM ops WHERE op_id = ?", (op_id,)).fetchone() is not None

    def mark_done(self, op: Op) -> None:
        self._set_state(op, "done", None)

    def mark_failed(self, op: Op, error: str) -> None:
        """Give up on an operation MLflow rejects for good (not for an unreachable server)."""
        self._set_state(op, "failed", error)

    def note_attempt(self, op: Op, error: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE ops SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                       (error[:2000], op.seq))

    def _set_state(self, op: Op, state: str, error: str | None) -> None:
        with self._connect() as db:
            db.execute("UPDATE ops SET state = ?, attempts = attempts + 1, last_error = ? "
                       "WHERE seq = ?", (state, error and error[:2000], op.seq))

    def expert_run(self, uri: str, expert_id: str) -> tuple[str, set[str]] | None:
        """(run id, artifact folders logged) of an expert's run at `uri`, as last noted."""
        with self._connect() as db:
            row = db.execute("SELECT run_id, artifacts FROM expert_runs WHERE uri = ? AND "
                             "expert_id = ?", (uri, expert_id)).fetchone()
        return None if row is None else (row[0], set(filter(None, row[1].split(","))))

    def note_expert_run(self, uri: str, expert_id: str, run_id: str,
                        artifacts: set[str]) -> None:
        """Remember an expert's run and its logged artifact folders, so a version's replay
        finds them without searching MLflow once per expert."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO expert_runs (uri, expert_id, run_id, artifacts) "
                       "VALUES (?,?,?,?)", (uri, expert_id, run_id, ",".join(sorted(artifacts))))

    @contextmanager
    def replay_lock(self) -> Iterator[bool]:
        """Exclusive right to replay, across threads and processes; yields False if held.

        The server's tracking thread and a CLI command may both try to replay: only one may,
        or both could see an operation as missing in MLflow and both create it.
        """
        handle = open(self.folder / LOCK_FILE, "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            handle.close()
