"""The wire form of a bundle: a deterministic, uncompressed tar of its files.

Packing is deterministic (sorted names, zero times and owners), so the same bundle always
gives the same bytes and the same sha256. `BundleArchive` describes those bytes as tar
headers plus spans of the bundle's own files, so they are sent straight from the files, with
no archive written first.

Reading trusts nothing. `ArchiveDigest` parses the tar as it streams in and hashes each file
in the same pass; it accepts only regular files with the bundle's known names, no
duplicates, and nothing but zeros after the end. `extract_members` then copies exactly the
bytes it hashed. The archive as a whole is never hashed: the manifest's sha256 (the expert
id, declared before the upload) and the manifest's sha256 of each file cover its content.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from protocol.bundle import OPTIONAL_FILES, REQUIRED_FILES
from protocol.errors import InvalidBundle

ALLOWED_FILES = frozenset(REQUIRED_FILES + OPTIONAL_FILES)
BLOCK = tarfile.BLOCKSIZE  # 512: tar headers and file contents are padded to this
_RECORD = tarfile.RECORDSIZE  # 10240: the archive's total is padded to this (tar -b20)
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


@dataclass(frozen=True)
class _FileSpan:
    path: Path  # one file of the bundle folder
    size: int  # its size when the archive was laid out


@dataclass(frozen=True)
class BundleArchive:
    """The deterministic tar of a bundle folder, as literal header/padding bytes and spans of
    the bundle's files. Nothing is written: `blocks` reads the files where they lie."""

    pieces: tuple[bytes | _FileSpan, ...]
    size: int  # archive bytes

    @classmethod
    def of(cls, bundle_dir: str | os.PathLike) -> BundleArchive:
        root = Path(bundle_dir)
        names = sorted(p.name for p in root.iterdir())
        unknown = [n for n in names if n not in ALLOWED_FILES]
        if unknown:
            raise InvalidBundle(f"bundle {root} holds unknown files {unknown}", field="files")
        pieces: list[bytes | _FileSpan] = []
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = (root / name).stat().st_size
            info.mode = 0o644
            pieces.append(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING,
                                     "surrogateescape"))
            pieces.append(_FileSpan(root / name, info.size))
            pieces.append(tarfile.NUL * (-info.size % BLOCK))
        size = sum(_length(p) for p in pieces) + 2 * BLOCK
        pieces.append(tarfile.NUL * (2 * BLOCK + (-size % _RECORD)))  # end blocks, record pad
        return cls(tuple(p for p in pieces if _length(p)), size + (-size % _RECORD))

    def blocks(self, offset: int = 0, block_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The archive's bytes from `offset` on, in blocks of at most `block_bytes`."""
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        pending, position = b"", 0
        for piece in self.pieces:
            start, position = max(offset - position, 0), position + _length(piece)
            if start >= _length(piece):
                continue
            if isinstance(piece, bytes):
                pending += piece[start:]
                while len(pending) >= block_bytes:
                    yield pending[:block_bytes]
                    pending = pending[block_bytes:]
                continue
            with open(piece.path, "rb") as handle:
                handle.seek(start)
                left = piece.size - start
                while left:
                    data = handle.read(min(left, block_bytes - len(pending)))
                    if not data:
                        raise InvalidBundle(f"{piece.path} shrank while it was being sent: "
                                            "leave the bundle folder alone until submit ends",
                                            field="files")
                    left -= len(data)
                    yield pending + data if pending else data
                    pending = b""
        if pending:
            yield pending


def _length(piece: bytes | _FileSpan) -> int:
    return len(piece) if isinstance(piece, bytes) else piece.size


def pack_bundle(bundle_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the bundle directory as a deterministic tar file at `dest`."""
    with open(dest, "wb") as handle:
        for block in BundleArchive.of(bundle_dir).blocks():
            handle.write(block)
    return Path(dest)


def pack_bundle_bytes(bundle_dir: str | os.PathLike) -> bytes:
    """The archive in memory (small bundles, tests)."""
    return b"".join(BundleArchive.of(bundle_dir).blocks())


# -- reading what arrives ------------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveMember:
    """One file of a received archive: where its bytes lie and what they hash to."""

    name: str
    offset: int  # of its first content byte in the archive
    size: int  # bytes
    sha256: str


class ArchiveDigest:
    """The files of an archive streaming in, and the sha256 of each, in one pass.

    Feed the bytes in order with `update`; `members()` then answers the files or raises the
    first thing wrong with the archive. The parse is strict where tarfile is lenient (no pax
    or GNU extension headers, nothing but zeros after the end), which only ever refuses more.
    Hashing releases the GIL, so a helper thread can run it beside the receiving one.
    """

    def __init__(self) -> None:
        self.parsed = 0  # bytes fed so far
        self._members: list[ArchiveMember] = []
        # The file whose content is streaming: name, content offset, size, its sha256 so far.
        self._current: tuple[str, int, int, hashlib._Hash] | None = None
        self._content_left = 0  # bytes of the current file still to come
        self._skip = 0  # padding bytes still to come
        self._header = bytearray()  # a header block arriving in pieces
        self._ended = False  # the end-of-archive block was seen
        self._error: InvalidBundle | None = None

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes of the archive."""
        if self._error is None:
            try:
                self._parse(memoryview(data))
            except InvalidBundle as err:
                self._error = err
        self.parsed += len(data)

    def covers(self, size: int) -> bool:
        """Whether exactly the first `size` bytes were fed."""
        return self.parsed == size

    def copy(self) -> ArchiveDigest:
        other = ArchiveDigest.__new__(ArchiveDigest)
        other.__dict__.update(self.__dict__)
        other._members = list(self._members)
        other._header = bytearray(self._header)
        if self._current is not None:
            name, offset, size, digest = self._current
            other._current = (name, offset, size, digest.copy())
        return other

    def members(self, max_bytes: int) -> list[ArchiveMember]:
        """The archive's files, once every byte was fed; InvalidBundle if it is not a
        well-formed bundle archive of at most `max_bytes` unpacked."""
        if self._error is not None:
            raise self._error
        if self._current is not None or self._header:
            inside = self._current[0] if self._current else "a header"
            raise InvalidBundle(f"the bundle archive ends inside {inside}: it is truncated",
                                field="archive")
        total = sum(m.size for m in self._members)
        if total > max_bytes:
            raise InvalidBundle(f"the bundle unpacks to {total} bytes, over the {max_bytes} "
                                "limit", field="archive")
        return list(self._members)

    def _parse(self, view: memoryview) -> None:
        position = self.parsed
        while view:
            if self._content_left:
                take = min(self._content_left, len(view))
                self._current[3].update(view[:take])
                self._content_left -= take
                if not self._content_left:
                    self._close_member()
            elif self._skip:
                take = min(self._skip, len(view))
                self._skip -= take
            elif self._ended:
                take = len(view)
                if view.tobytes().count(0) != take:
                    raise InvalidBundle("the bundle archive has data after its end",
                                        field="archive")
            else:
                take = min(BLOCK - len(self._header), len(view))
                self._header += view[:take]
                if len(self._header) == BLOCK:
                    self._on_header(bytes(self._header), position + take)
                    self._header.clear()
            view, position = view[take:], position + take

    def _on_header(self, block: bytes, content_offset: int) -> None:
        if block.count(0) == BLOCK:
            self._ended = True
            return
        name, size = parse_header(block)
        if name in {m.name for m in self._members}:
            raise InvalidBundle("the bundle archive lists a file twice", field="archive")
        self._current = (name, content_offset, size, hashlib.sha256())
        self._content_left = size
        if not size:
            self._close_member()

    def _close_member(self) -> None:
        name, offset, size, digest = self._current
        self._members.append(ArchiveMember(name, offset, size, digest.hexdigest()))
        self._current = None
        self._skip = -size % BLOCK


def parse_header(block: bytes) -> tuple[str, int]:
    """(name, size) of a tar header block for a regular file with an allowed name."""
    stored = _octal(block[148:156], "checksum")
    unsigned = 256 + sum(struct.unpack_from("148B8x356B", block))
    signed = 256 + sum(struct.unpack_from("148b8x356b", block))
    if stored not in (unsigned, signed):
        raise InvalidBundle("the bundle archive has a header with a bad checksum: it was "
                            "corrupted", field="archive")
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]  # ustar's name prefix (tarfile reads it too)
    shown = (prefix + b"/" + name if prefix else name).decode("ascii", "replace")
    if prefix or shown not in ALLOWED_FILES or block[156:157] not in _REGULAR_TYPES:
        raise InvalidBundle(
            f"the bundle archive holds {shown[:80]!r}; only regular files named "
            f"{sorted(ALLOWED_FILES)} are allowed", field="archive")
    return shown, _octal(block[124:136], "size")


_OCTAL = re.compile(rb" *([0-7]+) *")


def _octal(field: bytes, what: str) -> int:
    """A tar number field: octal digits, space-padded, ended by NUL or space. Python's int()
    also reads a sign, underscores and a 0o prefix ("-0000000001" is -1): refuse them all."""
    match = _OCTAL.fullmatch(field.split(b"\0", 1)[0])
    if match is None:
        raise InvalidBundle(f"the bundle archive has a header whose {what} is not an octal "
                            "number", field="archive")
    return int(match.group(1), 8)


def extract_members(archive: str | os.PathLike, members: list[ArchiveMember],
                    dest: str | os.PathLike) -> Path:
    """Copy each member's bytes (as `ArchiveDigest` found them) into the new folder `dest`.

    The copy stays in the kernel (copy_file_range) where the file system allows.
    """
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=False)
    with open(archive, "rb") as source:
        for member in members:
            fd = os.open(target / member.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _copy_range(source.fileno(), fd, member.offset, member.size)
            finally:
                os.close(fd)
    return target


def _copy_range(source: int, dest: int, offset: int, size: int) -> None:
    done = 0
    while done < size:
        try:
            copied = os.copy_file_range(source, dest, size - done, offset + done)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = os.write(dest, os.pread(source, min(size - done, 1 << 20),
                                             offset + done))
        if not copied:
            raise InvalidBundle("the bundle archive is shorter than its headers say",
                                field="archive")
        done += copied
