"""Resumable uploads of bundle archives: start, append at the committed offset, finish.

In the style of google.bytestream: an upload has a declared size and expert id (the sha256 of
the bundle's canonical manifest); its bytes go to `uploads/<id>.part`, whose size is the
committed offset (fsynced before it is reported, so an acknowledged offset survives a crash).
Each file inside the archive is hashed as it arrives (`ArchiveDigest`), so finishing reads
nothing twice: it copies the files into staging, validates them against the base model
(each file's sha256 against the manifest, the manifest against the declared expert id,
shapes, dtypes, finite values) and hands the bundle to `Store.commit_expert`. That chain of
hashes covers every byte that is kept, so the archive as a whole is never hashed, by either
side. A failed finish discards the upload, so a rejected bundle leaves the store as it was.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.intake.writer import UploadState, UploadWriter
from coordinator.store.experts import ExpertRecord, Store
from protocol.archive import ArchiveDigest, extract_members
from protocol.bundle import (
    MANIFEST,
    MAX_UPDATE_RATIO,
    BaseSpec,
    Bundle,
    check_update_norms,
    fsync_path,
    load_bundle,
)
from protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    InvalidBundle,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from protocol.manifest import SHA256_RE
from protocol.names import check_name, preview

log = logging.getLogger(__name__)
_LOCK_WAIT_S = 10.0  # how long a second stream waits for the upload's current one to end


@dataclass(frozen=True)
class UploadLimits:
    """What one contributor may send. Defaults suit a laptop-sized federation."""

    max_bundle_bytes: int = 512 * 1024 * 1024  # largest archive accepted
    max_concurrent_uploads: int = 4  # live (unfinished) uploads per contributor
    idle_timeout_s: float = 3600.0  # an upload with no bytes for this long expires
    stream_idle_timeout_s: float = 60.0  # a stream with no chunk for this long is cancelled
    # A stream that brought less than this many bytes per second, averaged from its start,
    # is cancelled once it is rate_grace_s old (the upload resumes from its committed bytes):
    # a drip of a byte a second would otherwise hold a server thread for hours.
    min_stream_rate: float = 16384.0
    rate_grace_s: float = 30.0
    quota_bytes: int | None = None  # total stored + in-flight archive bytes; None: no quota
    # largest update of a module, ||dW||_F over the base weight's ||W||_F (0: no bound);
    # see protocol.bundle.check_update_norms
    max_update_ratio: float = MAX_UPDATE_RATIO

    def __post_init__(self) -> None:
        if self.max_bundle_bytes <= 0 or self.max_concurrent_uploads <= 0:
            raise InvalidArgument("max_bundle_bytes and max_concurrent_uploads must be "
                                  "positive", field="limits")
        if self.min_stream_rate < 0 or self.rate_grace_s <= 0:
            raise InvalidArgument("min_stream_rate must be at least 0 and rate_grace_s "
                                  "positive", field="limits")
        if self.idle_timeout_s <= 0 or self.stream_idle_timeout_s <= 0:
            raise InvalidArgument("idle_timeout_s and stream_idle_timeout_s must be positive",
                                  field="limits")


@dataclass(frozen=True)
class FinishResult:
    expert: ExpertRecord
    already_stored: bool  # the same content was stored before; nothing new was written


class Uploads:
    """All uploads of one store, checked against one base model. Thread-safe."""

    def __init__(self, store: Store, base: BaseSpec, limits: UploadLimits) -> None:
        self.store = store
        self.base = base
        self.limits = limits
        self._guard = threading.Lock()  # protects the dicts below and upload creation
        self._locks: dict[str, threading.Lock] = {}
        self._digests: dict[str, ArchiveDigest] = {}  # id -> digest of the part file so far
        self._commit = threading.Lock()  # one rename-and-index at a time
        # Streams being written now: id -> (writer, how to cancel its RPC).
        self._streams: dict[str, tuple[UploadWriter, Callable[[], object]]] = {}
        # Streams whose first message has not come yet: key -> (opened at, how to cancel).
        self._opening: dict[object, tuple[float, Callable[[], object]]] = {}

    def part_path(self, upload_id: str) -> Path:
        return self.store.layout.uploads / f"{upload_id}.part"

    def start(self, contributor: str, size_bytes: int, expert_id: str,
              name: str) -> UploadState | ExpertRecord:
        """Open an upload, resume the contributor's live one for the same bundle, or answer
        the stored expert when this bundle is already stored."""
        self._check_declaration(size_bytes, expert_id, name)
        existing = self.store.find_expert(expert_id)
        if existing is not None:
            return existing
        with self._guard:
            rows = self.store.query("SELECT * FROM uploads WHERE contributor = ?",
                                    (contributor,))
            for row in rows:
                if row["expert_id"] == expert_id and row["size_bytes"] == size_bytes:
                    self._touch(row["upload_id"])
                    return self._state(row)
            self._check_capacity(contributor, len(rows), size_bytes)
            upload_id = secrets.token_hex(16)
            self.part_path(upload_id).touch()
            now = time.time()
            with self.store.transaction() as conn:
                conn.execute(
                    "INSERT INTO uploads (upload_id, contributor, name, size_bytes, expert_id, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (upload_id, contributor, name, size_bytes, expert_id, now, now))
        log.info("upload %s started by %s: %s, %d bytes", upload_id, contributor, name,
                 size_bytes)
        return UploadState(upload_id, contributor, name, size_bytes, expert_id, 0)

    def status(self, upload_id: str, contributor: str) -> UploadState:
        return self._state(self._row(upload_id, contributor))

    @contextmanager
    def writer(self, upload_id: str, contributor: str,
               cancel: Callable[[], object] | None = None) -> Iterator[UploadWriter]:
        """Hold the upload for one stream; the bytes are fsynced when the stream ends.

        `cancel` ends the stream's RPC; `cancel_stalled` calls it when no chunk arrives for
        `stream_idle_timeout_s`, so a slow drip cannot hold the upload forever.
        """
        self._row(upload_id, contributor)  # unknown ids fail before they get a lock
        with self._hold(upload_id):
            state = self.status(upload_id, contributor)
            writer = UploadWriter(state, self.part_path(upload_id), self._digest(state))
            with self._guard:
                self._streams[upload_id] = (writer, cancel or (lambda: None))
            try:
                yield writer
            finally:
                try:
                    writer.close()
                finally:
                    with self._guard:
                        self._streams.pop(upload_id, None)
                        self._digests[upload_id] = writer.digest
                    self._touch(upload_id)

    def finish(self, upload_id: str, contributor: str) -> FinishResult:
        """Verify, validate and commit the upload; see the module docstring."""
        self._row(upload_id, contributor)  # unknown ids fail before they get a lock
        with self._hold(upload_id):
            state = self.status(upload_id, contributor)
            if state.committed_bytes != state.size_bytes:
                raise FailedPrecondition(
                    f"upload {upload_id} holds {state.committed_bytes} of {state.size_bytes} "
                    f"bytes: send the rest from offset {state.committed_bytes}, then finish",
                    field="upload_id")
            try:
                return self._verify_and_commit(state)
            except BaseException:
                self._discard(upload_id)
                raise

    def _verify_and_commit(self, state: UploadState) -> FinishResult:
        existing = self.store.find_expert(state.expert_id)
        if existing is not None:  # stored meanwhile, by another upload of the same bundle
            self._discard(state.upload_id)
            return FinishResult(existing, True)
        staged = self.store.layout.staging / state.upload_id
        shutil.rmtree(staged, ignore_errors=True)
        try:
            bundle = self._stage(self._digest(state), state.upload_id, staged)
            if bundle.expert_id != state.expert_id:
                raise InvalidBundle(
                    f"the uploaded manifest's expert id is {bundle.expert_id[:12]}..., not the "
                    f"declared {state.expert_id[:12]}...: the bundle changed or was corrupted "
                    "on the way; leave its folder alone and resubmit", field="expert_id")
            if bundle.manifest.name != state.name:
                raise InvalidBundle(
                    f"the upload was started for the expert {preview(state.name)} but its "
                    f"manifest names {preview(bundle.manifest.name)}: start the upload with "
                    "the manifest's name", field="name")
            # Store exactly the bytes the expert id covers, however the sender formatted them.
            (staged / MANIFEST).write_bytes(bundle.manifest.canonical_bytes())
            with self._commit:
                existing = self.store.find_expert(bundle.expert_id)
                if existing is not None:
                    self._discard(state.upload_id)
                    return FinishResult(existing, True)
                record = self.store.commit_expert(
                    bundle, staged, contributor=state.contributor,
                    size_bytes=state.size_bytes, upload_id=state.upload_id)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        self._forget(state.upload_id)
        log.info("expert %s (%s) accepted from %s", record.expert_id, record.name,
                 record.contributor)
        return FinishResult(record, False)

    def _stage(self, archive: ArchiveDigest, upload_id: str, staged: Path) -> Bundle:
        """Copy the archive's files into `staged` and validate them there, with the hashes
        taken as they streamed in. A helper thread flushes the files to disk meanwhile, so the
        commit's fsync finds little left to write."""
        members = archive.members(self.limits.max_bundle_bytes)
        extract_members(self.part_path(upload_id), members, staged)
        flush = threading.Thread(target=_flush_folder, args=(staged,), name="stage-flush")
        flush.start()
        try:
            bundle = load_bundle(staged, self.base, mapped=True,
                                 known_sha256={m.name: m.sha256 for m in members})
            check_update_norms(bundle, self.base, self.limits.max_update_ratio)
            return bundle
        finally:
            flush.join()

    def cancel(self, upload_id: str, contributor: str) -> None:
        """Abandon one of the contributor's unfinished uploads: end the stream writing it, if
        any, then delete its bytes and free its slot. NotFound for an id that is not theirs,
        finished or expired (another contributor's id gets the same answer as an unknown one).
        """
        self._row(upload_id, contributor)
        with self._guard:
            stream = self._streams.get(upload_id)
        if stream is not None:
            stream[1]()  # ends the WriteUpload RPC; its writer closes and releases the upload
        with self._hold(upload_id):
            self._row(upload_id, contributor)  # a finish may have committed it meanwhile
            self._discard(upload_id)
        log.info("upload %s cancelled by %s", upload_id, contributor)

    @contextmanager
    def opening(self, cancel: Callable[[], object]) -> Iterator[None]:
        """Watch a stream until its first message names the upload: a stream that sends
        nothing is cancelled by `cancel_stalled` like one that stops half-way."""
        key = object()
        with self._guard:
            self._opening[key] = (time.monotonic(), cancel)
        try:
            yield
        finally:
            with self._guard:
                self._opening.pop(key, None)

    def streams(self) -> int:
        """Upload streams being received now."""
        with self._guard:
            return len(self._streams)

    def cancel_stalled(self, now: float | None = None) -> list[str]:
        """Cancel streams that sent no chunk for `stream_idle_timeout_s` (monotonic time);
        the ids of their uploads ("that named no upload" for a stream that sent nothing)."""
        now = time.monotonic() if now is None else now
        cutoff = now - self.limits.stream_idle_timeout_s
        with self._guard:
            stalled = [(upload_id, cancel, f"no data for {self.limits.stream_idle_timeout_s:.0f} s")
                       for upload_id, (writer, cancel) in self._streams.items()
                       if writer.last_chunk_at < cutoff]
            stalled += [(upload_id, cancel, f"{self._rate(writer, now):.0f} bytes/s, under the "
                                            f"minimum {self.limits.min_stream_rate:.0f}")
                        for upload_id, (writer, cancel) in self._streams.items()
                        if writer.last_chunk_at >= cutoff and self._too_slow(writer, now)]
            stalled += [("that named no upload", cancel, "no first message")
                        for opened, cancel in self._opening.values() if opened < cutoff]
        for upload_id, cancel, why in stalled:
            log.warning("cancelling upload stream %s: %s", upload_id, why)
            cancel()
        return [upload_id for upload_id, _, _ in stalled]

    def _too_slow(self, writer: UploadWriter, now: float) -> bool:
        return (now - writer.started_at >= self.limits.rate_grace_s
                and self._rate(writer, now) < self.limits.min_stream_rate)

    @staticmethod
    def _rate(writer: UploadWriter, now: float) -> float:
        return writer.received / max(now - writer.started_at, 1e-9)

    def expire(self, now: float | None = None) -> list[str]:
        """Discard uploads idle for longer than the limit and not being written now."""
        cutoff = (time.time() if now is None else now) - self.limits.idle_timeout_s
        rows = self.store.query("SELECT upload_id FROM uploads WHERE updated_at < ? AND "
                                "committing_expert_id IS NULL", (cutoff,))
        expired = []
        for row in rows:
            lock = self._lock_for(row["upload_id"])
            if lock.acquire(blocking=False):
                try:
                    self._discard(row["upload_id"])
                finally:
                    lock.release()
                expired.append(row["upload_id"])
        if expired:
            log.info("expired %d idle uploads", len(expired))
        return expired

    # -- helpers -----------------------------------------------------------------------

    def _check_declaration(self, size_bytes: int, expert_id: str, name: str) -> None:
        if not SHA256_RE.fullmatch(expert_id):
            raise InvalidArgument("expert_id must be the bundle's expert id (the sha256 of its "
                                  "canonical manifest) as 64 lowercase hex digits",
                                  field="expert_id")
        if size_bytes <= 0:
            raise InvalidArgument(f"size_bytes must be the archive's size, got {size_bytes}",
                                  field="size_bytes")
        if size_bytes > self.limits.max_bundle_bytes:
            raise ResourceExhausted(
                f"the archive is {size_bytes} bytes, over this coordinator's limit of "
                f"{self.limits.max_bundle_bytes}: use a lower rank or fewer modules",
                field="size_bytes")
        check_name(name, "the upload's name", "name", ": send the bundle's manifest.name")

    def _check_capacity(self, contributor: str, live: int, size_bytes: int) -> None:
        if live >= self.limits.max_concurrent_uploads:
            raise ResourceExhausted(
                f"contributor {contributor} already has {live} unfinished uploads (limit "
                f"{self.limits.max_concurrent_uploads}): finish them, or wait "
                f"{self.limits.idle_timeout_s:.0f} s for idle ones to expire",
                field="uploads")
        quota = self.limits.quota_bytes
        if quota is not None and self.store.stored_bytes() + size_bytes > quota:
            raise ResourceExhausted(
                f"the store is full: {size_bytes} more bytes would pass its quota of {quota}; "
                "ask the coordinator's operator", field="size_bytes")

    def _row(self, upload_id: str, contributor: str):
        rows = self.store.query("SELECT * FROM uploads WHERE upload_id = ? AND "
                                "contributor = ?", (upload_id, contributor))
        if not rows:
            raise NotFound(f"no upload {upload_id[:40]!r} of yours is open: it finished, "
                           "failed or expired; start it again", field="upload_id")
        return rows[0]

    def _state(self, row) -> UploadState:
        return UploadState(row["upload_id"], row["contributor"], row["name"],
                           row["size_bytes"], row["expert_id"],
                           self._committed(row["upload_id"]))

    def _committed(self, upload_id: str) -> int:
        """The part file's size, fsynced first so that the answer stays true after a crash."""
        path = self.part_path(upload_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            os.fsync(fd)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _digest(self, state: UploadState) -> ArchiveDigest:
        """The digest of the part file's bytes so far: the cached one (when it covers exactly
        the committed bytes), or recomputed from the file, as after a restart."""
        with self._guard:
            cached = self._digests.get(state.upload_id)
        if cached is not None and cached.covers(state.committed_bytes):
            return cached.copy()
        digest = ArchiveDigest()
        with open(self.part_path(state.upload_id), "ab+") as handle:
            handle.seek(0)
            while block := handle.read(1 << 20):
                digest.update(block)
        return digest

    def _lock_for(self, upload_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(upload_id, threading.Lock())

    @contextmanager
    def _hold(self, upload_id: str) -> Iterator[None]:
        lock = self._lock_for(upload_id)
        if not lock.acquire(timeout=_LOCK_WAIT_S):
            raise Unavailable(f"upload {upload_id} is being written by another stream: "
                              "retry in a moment", field="upload_id")
        try:
            yield
        finally:
            lock.release()

    def _touch(self, upload_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE uploads SET updated_at = ? WHERE upload_id = ?",
                         (time.time(), upload_id))

    def _discard(self, upload_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
        self.part_path(upload_id).unlink(missing_ok=True)
        shutil.rmtree(self.store.layout.staging / upload_id, ignore_errors=True)
        self._forget(upload_id)

    def _forget(self, upload_id: str) -> None:
        self.part_path(upload_id).unlink(missing_ok=True)
        with self._guard:
            self._digests.pop(upload_id, None)
            self._locks.pop(upload_id, None)



def _flush_folder(folder: Path) -> None:
    """fsync every file in `folder`, ignoring failures: the commit fsyncs again and reports."""
    for child in folder.iterdir():
        try:
            fsync_path(child)
        except OSError:
            pass
