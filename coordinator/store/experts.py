"""The coordinator's durable store: expert bundles as content-addressed objects
(coordinator.store.objects), a SQLite index of who sent which.

Where each file lives is `coordinator.store.layout.Layout`'s to say. An expert's bundle
appears whole (one atomic rename on disk), and its index row in one transaction right after;
`recover()` (run when the server starts) finishes or undoes whatever a crash interrupted, so
the store holds either nothing or a complete expert, and never loses an acknowledged one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.store.layout import Layout, atomic_write
from coordinator.store.objects import DiskObjects, Objects
from protocol.bundle import BaseSpec, Bundle, load_bundle
from protocol.errors import FailedPrecondition, GaggleError, InvalidArgument, NotFound

log = logging.getLogger(__name__)
EXPERTS = "experts"  # the object kind of bundles (coordinator.store.objects)
MAX_REASON = 300  # characters of a quarantine reason
# Every expert with its quarantine reason, if any
_EXPERTS = ("SELECT experts.*, quarantine.reason AS quarantine FROM experts "
            "LEFT JOIN quarantine ON quarantine.expert_id = experts.expert_id")


SCHEMA = """
CREATE TABLE IF NOT EXISTS contributors (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL DEFAULT 'contributor',  -- 'contributor' or 'admin'
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,                 -- public part of the token, for lookup
    contributor TEXT NOT NULL REFERENCES contributors(name),
    token_hash TEXT NOT NULL,                  -- sha256 of the whole token; never the token
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS experts (
    expert_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    contributor TEXT NOT NULL,
    method TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,  -- archive bytes uploaded
    num_modules INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    contributor TEXT NOT NULL,
    name TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    expert_id TEXT NOT NULL,  -- declared: sha256 of the bundle's canonical manifest
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    committing_expert_id TEXT  -- set just before the rename into experts/, for recovery
);
CREATE TABLE IF NOT EXISTS quarantine (
    expert_id TEXT PRIMARY KEY,  -- left out of new versions until an operator releases it
    reason TEXT NOT NULL,        -- one line: the check that failed and on which version
    version_id TEXT NOT NULL,    -- the rejected version that named it
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ExpertRecord:
    """One stored expert, as the index knows it."""

    expert_id: str  # sha256 of the canonical manifest (protocol.bundle.Bundle.expert_id)
    name: str
    contributor: str  # from the uploader's token, never from the manifest
    method: str  # "lora" or "ia3"
    size_bytes: int  # archive size
    created_at: float  # unix time of acceptance
    num_modules: int = 0
    quarantine: str | None = None  # why it is left out of new versions (None: it is not)

    @property
    def key(self) -> str:
        """How versions, diffs, usage reports and MLflow know this expert (expert_key)."""
        return expert_key(self.contributor, self.name)


def expert_key(contributor: str, name: str) -> str:
    """`contributor/name`: unique in a store, where a name alone would let one contributor's
    expert shadow another's. '/' occurs in neither part (protocol.names)."""
    return f"{contributor}/{name}"


class Store:
    """A store folder: its index, its expert folders and the cached base spec. Thread-safe."""

    def __init__(self, path: str | os.PathLike, *, recover: bool = False) -> None:
        """Open (creating if needed) the store at `path`.

        `recover=True` runs `recover()`: only the serving coordinator may do that, since it
        would discard another process's uploads in flight.
        """
        self.layout = Layout.of(path)
        self.root = self.layout.root
        self.objects: Objects = DiskObjects(self.root)
        for folder in (self.layout.experts, self.layout.uploads, self.layout.staging):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.layout.index, timeout=30,
                                     isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss, not only a killed process.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self.transaction() as conn:
            for statement in _statements():
                conn.execute(statement)
            _migrate(conn)
        if recover:
            self.recover()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE), committed on exit, rolled back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- experts -----------------------------------------------------------------------

    def list_experts(self, contributor: str | None = None) -> list[ExpertRecord]:
        """Stored experts, oldest first; only `contributor`'s when given."""
        if contributor:
            rows = self.query(f"{_EXPERTS} WHERE contributor = ? ORDER BY created_at, "
                              "experts.expert_id", (contributor,))
        else:
            rows = self.query(f"{_EXPERTS} ORDER BY created_at, experts.expert_id")
        return [self._record(row) for row in rows]

    def get_expert(self, expert_id: str) -> ExpertRecord:
        found = self.find_expert(expert_id)
        if found is None:
            raise NotFound(f"no expert {expert_id!r} in this store: list them with "
                           "`gaggle-coordinator experts` or ListExperts", field="expert_id")
        return found

    def find_expert(self, expert_id: str) -> ExpertRecord | None:
        rows = self.query(f"{_EXPERTS} WHERE experts.expert_id = ?", (expert_id,))
        return self._record(rows[0]) if rows else None

    def resolve_expert(self, prefix: str) -> ExpertRecord:
        """An expert by its id or a unique prefix of it (as `experts` lists them)."""
        if not prefix or not all(c in "0123456789abcdef" for c in prefix):
            raise InvalidArgument(f"{prefix[:70]!r} is not an expert id: use the hex digits "
                                  "`gaggle-coordinator experts` lists", field="expert_id")
        rows = self.query(f"{_EXPERTS} WHERE experts.expert_id LIKE ?", (prefix + "%",))
        if len(rows) != 1:
            raise (NotFound if not rows else InvalidArgument)(
                f"{'no' if not rows else 'more than one'} expert whose id starts with "
                f"{prefix!r}: list them with `gaggle-coordinator experts`", field="expert_id")
        return self._record(rows[0])

    # -- quarantine ------------------------------------------------------------------------

    def quarantine(self, expert_id: str, reason: str, version_id: str) -> None:
        """Leave an expert out of new versions (coordinator.versions.assemble) until
        `release`; the reason is one bounded line, shown to its contributor."""
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO quarantine (expert_id, reason, version_id, "
                         "created_at) VALUES (?, ?, ?, ?)",
                         (expert_id, reason[:MAX_REASON], version_id, time.time()))

    def release(self, expert_id: str) -> bool:
        """Let a quarantined expert into new versions again; False if it was not held."""
        with self.transaction() as conn:
            return conn.execute("DELETE FROM quarantine WHERE expert_id = ?",
                                (expert_id,)).rowcount == 1

    def remove_expert(self, expert_id: str) -> int:
        """Delete an expert from the index and its bundle and key shard from the store;
        returns the bytes freed. Versions that hold it keep naming it (pruning removes
        them)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM quarantine WHERE expert_id = ?", (expert_id,))
            conn.execute("DELETE FROM experts WHERE expert_id = ?", (expert_id,))
        return self.objects.delete(EXPERTS, expert_id) + self.objects.delete("keys", expert_id)

    def bundle_folder(self, expert_id: str) -> Path:
        """A local folder holding the expert's bundle (load it with protocol.bundle)."""
        return self.objects.local_folder(EXPERTS, expert_id)

    def bundle_files(self, expert_id: str) -> dict[str, bytes]:
        """The expert's bundle files, as bytes (what travels to Ray)."""
        return self.objects.get(EXPERTS, expert_id)

    def stored_bytes(self) -> int:
        """Archive bytes of every stored expert plus the declared size of live uploads."""
        rows = self.query("SELECT (SELECT COALESCE(SUM(size_bytes), 0) FROM experts) + "
                          "(SELECT COALESCE(SUM(size_bytes), 0) FROM uploads)")
        return int(rows[0][0])

    def _record(self, row: sqlite3.Row) -> ExpertRecord:
        return ExpertRecord(
            expert_id=row["expert_id"], name=row["name"], contributor=row["contributor"],
            method=row["method"], size_bytes=row["size_bytes"], created_at=row["created_at"],
            num_modules=row["num_modules"], quarantine=row["quarantine"],
        )

    def commit_expert(self, bundle: Bundle, staged: Path, *, contributor: str,
                      size_bytes: int, upload_id: str) -> ExpertRecord:
        """Move a validated, staged bundle folder into place and index it, atomically.

        The upload row is marked first, so that a crash between the rename and the index
        commit can be finished by `recover()` with the right contributor.
        """
        expert_id = bundle.expert_id
        with self.transaction() as conn:
            conn.execute("UPDATE uploads SET committing_expert_id = ? WHERE upload_id = ?",
                         (expert_id, upload_id))
        self.objects.put_folder(EXPERTS, expert_id, staged)
        record = ExpertRecord(
            expert_id=expert_id, name=bundle.name, contributor=contributor,
            method=bundle.manifest.method, size_bytes=size_bytes, created_at=time.time(),
            num_modules=len(bundle.manifest.modules),
        )
        with self.transaction() as conn:
            _insert_expert(conn, record)
            conn.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
        return record

    # -- base model --------------------------------------------------------------------

    def cache_base_spec(self, spec: BaseSpec) -> None:
        """Remember the federation's base model, refusing to switch once experts exist."""
        cached = self.cached_base_spec()
        if cached and cached.fingerprint != spec.fingerprint and self.list_experts():
            raise FailedPrecondition(
                f"store {self.root} holds experts for base model {cached.name!r} "
                f"(fingerprint {cached.fingerprint[:12]}...), not {spec.name!r} "
                f"({spec.fingerprint[:12]}...): serve it with --base {cached.name}, or use "
                "a new --store folder",
                field="base",
            )
        data = {"name": spec.name, "fingerprint": spec.fingerprint,
                "linears": {k: list(v) for k, v in spec.linears.items()},
                "weight_norms": spec.weight_norms}
        atomic_write(self.layout.base_spec, json.dumps(data, indent=1).encode())

    def cached_base_spec(self) -> BaseSpec | None:
        path = self.layout.base_spec
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return BaseSpec(name=data["name"], fingerprint=data["fingerprint"],
                        linears={k: (v[0], v[1]) for k, v in data["linears"].items()},
                        weight_norms=data.get("weight_norms"))

    def base_spec(self, name: str) -> BaseSpec:
        """The spec of base model `name`: cached in base.json, else loaded once and cached
        (again when the cached one predates the weights' norms)."""
        cached = self.cached_base_spec()
        if cached is not None and cached.name == name and cached.weight_norms is not None:
            return cached
        from routing.base import load_base  # heavy (transformers): only on first use

        log.info("loading base model %s to compute its fingerprint", name)
        spec = load_base(name).spec()
        self.cache_base_spec(spec)
        return spec

    # -- recovery ----------------------------------------------------------------------

    def recover(self, base: BaseSpec | None = None) -> None:
        """Finish or undo what a crash interrupted; see the module docstring.

        `base` (default: the cached spec) is what an interrupted expert is re-validated
        against before it is indexed.
        """
        base = base or self.cached_base_spec()
        with self._lock:
            shutil.rmtree(self.layout.staging, ignore_errors=True)
            self.layout.staging.mkdir(exist_ok=True)
            self.objects.clean_staging()
            indexed = {r["expert_id"] for r in self.query("SELECT expert_id FROM experts")}
            for expert_id in self.objects.list(EXPERTS):
                if expert_id not in indexed:
                    self._reconcile_expert_folder(self.bundle_folder(expert_id), base)
            with self.transaction() as conn:
                # Commits that crashed before their rename: the upload can be finished again.
                conn.execute("UPDATE uploads SET committing_expert_id = NULL")
            live = {r["upload_id"] for r in self.query("SELECT upload_id FROM uploads")}
            for part in self.layout.uploads.iterdir():
                if part.name.removesuffix(".part") not in live:
                    part.unlink(missing_ok=True)

    def _reconcile_expert_folder(self, folder: Path, base: BaseSpec | None) -> None:
        """An expert folder without its index row: index it if its upload says so, or drop it."""
        rows = self.query("SELECT * FROM uploads WHERE committing_expert_id = ?",
                          (folder.name,))
        if rows:

            upload = rows[0]
            try:
                bundle = load_bundle(folder, base)
            except GaggleError as err:
                log.warning("dropping unindexed expert folder %s: %s", folder.name, err)
            else:
                if bundle.expert_id == folder.name:
                    record = ExpertRecord(
                        expert_id=folder.name, name=bundle.name,
                        contributor=upload["contributor"], method=bundle.manifest.method,
                        size_bytes=upload["size_bytes"],
                        created_at=time.time(), num_modules=len(bundle.manifest.modules))
                    with self.transaction() as conn:
                        _insert_expert(conn, record)
                        conn.execute("DELETE FROM uploads WHERE upload_id = ?",
                                     (upload["upload_id"],))
                    log.info("recovered expert %s interrupted before indexing", folder.name)
                    return
        log.warning("removing expert folder %s: no index row and no upload committing it",
                    folder.name)
        self.objects.delete(EXPERTS, folder.name)


def _statements() -> list[str]:
    # executescript would COMMIT our open transaction, so run the schema one statement each.
    lines = [line.split("--", 1)[0] for line in SCHEMA.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an index written by an earlier gaggle to SCHEMA: uploads were declared by the
    archive's sha256 and experts recorded it; both now go by the expert id alone."""
    experts = {row[1] for row in conn.execute("PRAGMA table_info(experts)")}
    if "archive_sha256" in experts:
        conn.execute("DROP INDEX IF EXISTS experts_by_archive")
        conn.execute("ALTER TABLE experts DROP COLUMN archive_sha256")
    uploads = {row[1] for row in conn.execute("PRAGMA table_info(uploads)")}
    if "sha256" in uploads:
        # A live upload declared by archive hash cannot be finished any more: drop it (its
        # contributor's submit starts a new one) and leave its part file to recover().
        conn.execute("DELETE FROM uploads WHERE committing_expert_id IS NULL")
        conn.execute("ALTER TABLE uploads RENAME COLUMN sha256 TO expert_id")


def _insert_expert(conn: sqlite3.Connection, record: ExpertRecord) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO experts (expert_id, name, contributor, method, size_bytes, "
        "num_modules, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (record.expert_id, record.name, record.contributor, record.method,
         record.size_bytes, record.num_modules, record.created_at),
    )
