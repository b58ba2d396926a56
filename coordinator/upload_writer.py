"""One stream's way to disk: append chunks to an upload's part file, hashing as they go."""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.archive import ArchiveDigest
from protocol.errors import InvalidArgument, OutOfRange

if TYPE_CHECKING:
    from coordinator.uploads import UploadState

_QUEUED_CHUNKS = 8  # chunks received but not yet handled, per thread and stream (~8 MiB)


class UploadWriter:
    """Appends one stream's chunks to an upload's part file, hashing and parsing as it goes.

    Two helper threads overlap with receiving the next chunk (writes and hashes release the
    GIL): one writes each chunk and feeds the archive's hash, then hands the chunk to the
    other, which parses the tar and hashes the files inside. So the parse never runs ahead of
    what is on disk. `close()` waits for both and fsyncs before the offset is reported.
    """

    def __init__(self, state: UploadState, path: Path, digest: ArchiveDigest) -> None:
        self.state = state
        self.digest = digest
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.offset = os.fstat(self._fd).st_size  # accepted so far (written or queued)
        self.last_chunk_at = time.monotonic()  # a stalled stream is cancelled (slow drip)
        self.written = self.offset  # on disk and in `digest`
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._to_parse: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._failure: BaseException | None = None
        self._threads = [threading.Thread(target=self._drain, name="upload-writer", daemon=True),
                         threading.Thread(target=self._parse, name="upload-parser", daemon=True)]
        for thread in self._threads:
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
        self._queue.put(data)
        self.offset += len(data)
        self.last_chunk_at = time.monotonic()

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._failure is not None:
                continue  # keep draining so that append() never blocks forever
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                self.digest.hash_archive(data)
                self.written += len(data)
                self._to_parse.put(data)
            except BaseException as err:
                self._failure = err
        self._to_parse.put(None)

    def _parse(self) -> None:
        while (data := self._to_parse.get()) is not None:
            try:
                self.digest.parse(data)
            except BaseException as err:  # a bug: a malformed archive is kept for members()
                self._failure = err

    def close(self) -> None:
        """Wait for queued chunks, fsync, close; raise what a helper thread hit, if any."""
        self._queue.put(None)
        for thread in self._threads:
            thread.join()
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        self.offset = self.written
        if self._failure is not None:
            raise self._failure
