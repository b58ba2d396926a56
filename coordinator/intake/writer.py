"""One stream's way to disk: append chunks to an upload's part file, hashing as they go."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator import metrics
from protocol.archive import ArchiveDigest
from protocol.errors import InvalidArgument, OutOfRange

_QUEUED_CHUNKS = 8  # chunks received but not yet handled, per thread and stream (~8 MiB)
_FLUSH_BYTES = 32 << 20  # written but unsynced bytes that wake the flusher


@dataclass(frozen=True)
class UploadState:
    """Where one upload stands: what was declared, and how many bytes are durable."""

    upload_id: str
    contributor: str
    name: str
    size_bytes: int  # declared archive size
    expert_id: str  # declared expert id: sha256 of the bundle's canonical manifest
    committed_bytes: int  # durable bytes so far: resume from here


class UploadWriter:
    """Appends one stream's chunks to an upload's part file, parsing and hashing as it goes.

    Helper threads overlap with receiving the next chunk (writes, hashes and syncs release
    the GIL): one writes each chunk, then hands it to a second, which parses the tar and
    hashes the files inside, so the parse never runs ahead of what is on disk. A third
    fdatasyncs the part file every _FLUSH_BYTES, so the disk writes while the stream runs.
    `close()` waits for all three and fsyncs the rest before the offset is reported.
    """

    def __init__(self, state: UploadState, path: Path, digest: ArchiveDigest) -> None:
        self.state = state
        self.digest = digest
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.offset = os.fstat(self._fd).st_size  # accepted so far (written or queued)
        self.started_at = time.monotonic()
        self.last_chunk_at = self.started_at  # a stalled stream is cancelled (slow drip)
        self.received = 0  # bytes this stream brought: a stream below the minimum rate goes
        self.written = self.offset  # on disk
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._to_parse: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._failure: BaseException | None = None
        self._unsynced = threading.Condition()  # guards written vs _synced and _closing
        self._synced = self.offset
        self._closing = False
        self._threads = [threading.Thread(target=self._drain, name="upload-writer", daemon=True),
                         threading.Thread(target=self._parse, name="upload-parser", daemon=True)]
        self._flusher = threading.Thread(target=self._flush, name="upload-flusher", daemon=True)
        for thread in (*self._threads, self._flusher):
            thread.start()

    def append(self, offset: int, data: bytes) -> None:
        if offset != self.offset:
            raise OutOfRange(
                f"chunk at offset {offset}, but upload {self.state.upload_id} has "
                f"{self.offset} bytes committed: resume from offset {self.offset}",
                field="offset")
        if self.offset + len(data) > self.state.size_bytes:
            raise InvalidArgument(
                f"chunk at offset {offset} of {len(data)} bytes goes past the declared size "
                f"{self.state.size_bytes}: declare the archive's exact size in StartUpload",
                field="data")
        if self._failure is not None:
            raise self._failure
        if not data:
            return  # an empty message is no progress: it does not keep the stream alive
        self._queue.put(data)
        self.offset += len(data)
        self.received += len(data)
        metrics.UPLOAD_BYTES.labels(metrics.contributor_label(self.state.contributor)).inc(
            len(data))
        self.last_chunk_at = time.monotonic()

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._failure is not None:
                continue  # keep draining so that append() never blocks forever
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                with self._unsynced:
                    self.written += len(data)
                    if self.written - self._synced >= _FLUSH_BYTES:
                        self._unsynced.notify()
                self._to_parse.put(data)
            except BaseException as err:
                self._failure = err
        self._to_parse.put(None)

    def _parse(self) -> None:
        while (data := self._to_parse.get()) is not None:
            try:
                self.digest.update(data)
            except BaseException as err:  # a bug: a malformed archive is kept for members()
                self._failure = err

    def _flush(self) -> None:
        while True:
            with self._unsynced:
                self._unsynced.wait_for(
                    lambda: self._closing or self.written - self._synced >= _FLUSH_BYTES)
                if self._closing:
                    return
                target = self.written
            try:
                os.fdatasync(self._fd)
            except OSError as err:
                self._failure = err
                return
            with self._unsynced:
                self._synced = target

    def close(self) -> None:
        """Wait for queued chunks, fsync, close; raise what a helper thread hit, if any."""
        self._queue.put(None)
        for thread in self._threads:
            thread.join()
        with self._unsynced:
            self._closing = True
            self._unsynced.notify()
        self._flusher.join()
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        self.offset = self.written
        if self._failure is not None:
            raise self._failure
