"""The wire form of a bundle: a deterministic, uncompressed tar of its files.

Packing is deterministic (sorted names, zero times and owners), so the same bundle always
gives the same bytes and the same sha256. Unpacking trusts nothing: only the bundle's known
file names, regular files, no duplicates, and a size cap; anything else is rejected before a
byte is written.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from protocol.bundle import OPTIONAL_FILES, REQUIRED_FILES
from protocol.errors import InvalidBundle

ALLOWED_FILES = frozenset(REQUIRED_FILES + OPTIONAL_FILES)


def pack_bundle(bundle_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the bundle directory as a deterministic tar file at `dest`."""
    with open(dest, "wb") as handle:
        _write_tar(Path(bundle_dir), handle)
    return Path(dest)


def pack_bundle_bytes(bundle_dir: str | os.PathLike) -> bytes:
    """The archive in memory (small bundles, tests)."""
    buffer = io.BytesIO()
    _write_tar(Path(bundle_dir), buffer)
    return buffer.getvalue()


def _write_tar(root: Path, fileobj: io.IOBase) -> None:
    names = sorted(p.name for p in root.iterdir())
    unknown = [n for n in names if n not in ALLOWED_FILES]
    if unknown:
        raise InvalidBundle(f"bundle {root} holds unknown files {unknown}", field="files")
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = (root / name).stat().st_size
            info.mode = 0o644
            with open(root / name, "rb") as handle:
                tar.addfile(info, handle)


def unpack_bundle(archive: str | os.PathLike, dest: str | os.PathLike, *,
                  max_bytes: int) -> Path:
    """Extract a bundle archive into the new directory `dest`, checking every member first."""
    target = Path(dest)
    try:
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()
            _check_members(members, max_bytes)
            target.mkdir(parents=True, exist_ok=False)
            for member in members:
                source = tar.extractfile(member)
                assert source is not None  # regular files only, checked above
                with open(target / member.name, "wb") as out:
                    while block := source.read(1 << 20):
                        out.write(block)
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as err:
        if isinstance(err, FileExistsError):
            raise
        raise InvalidBundle(f"the upload is not a readable bundle archive: {err}",
                            field="archive") from None
    return target


def _check_members(members: list[tarfile.TarInfo], max_bytes: int) -> None:
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise InvalidBundle("the bundle archive lists a file twice", field="archive")
    total = 0
    for member in members:
        if member.name not in ALLOWED_FILES or not member.isreg():
            raise InvalidBundle(
                f"the bundle archive holds {member.name[:80]!r}; only regular files named "
                f"{sorted(ALLOWED_FILES)} are allowed",
                field="archive",
            )
        total += member.size
    if total > max_bytes:
        raise InvalidBundle(f"the bundle unpacks to {total} bytes, over the {max_bytes} limit",
                            field="archive")
