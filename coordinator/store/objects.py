"""Content-addressed objects: every byte the coordinator keeps of an expert, stored once.

An object is a small set of named files (an expert's bundle, its key shard) put once under
(kind, id), where the id is a content address, and never changed after. Router versions refer
to objects by id and copy none, so storage grows with what contributors sent, not with the
number of versions. Every module reaches objects through `Objects`; `DiskObjects` keeps them
in the store folder, and object storage would be one more class behind the same methods
(tests/coordinator/test_objects.py runs one contract suite against every implementation).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

from protocol.bundle import fsync_path
from protocol.errors import InvalidArgument, NotFound
from routing.version import EXPERTS_DIR, KEYS_DIR

# The kinds of object, each a folder of a store laid out as routing.version reads a version
# by reference: experts/<expert_id>/ (bundles), keys/<expert_id>/ (key shards).
KINDS = (EXPERTS_DIR, KEYS_DIR)
_STAGING = ".staging-objects"


class Objects(ABC):
    """Put once, read many times, delete when nothing refers to it (pruning)."""

    @abstractmethod
    def put(self, kind: str, object_id: str, files: Mapping[str, bytes]) -> bool:
        """Store an object whole or not at all; False (and nothing changed) if it exists."""

    def put_folder(self, kind: str, object_id: str, folder: Path) -> bool:
        """Store the files of a local folder as an object; the folder may be consumed."""
        return self.put(kind, object_id, {p.name: p.read_bytes()
                                          for p in sorted(folder.iterdir()) if p.is_file()})

    @abstractmethod
    def get(self, kind: str, object_id: str) -> dict[str, bytes]:
        """The object's files; NotFound if there is no such object."""

    @abstractmethod
    def exists(self, kind: str, object_id: str) -> bool: ...

    @abstractmethod
    def list(self, kind: str) -> list[str]:
        """The ids of every object of a kind, sorted."""

    @abstractmethod
    def delete(self, kind: str, object_id: str) -> int:
        """Remove an object; returns the bytes freed (0 if it did not exist)."""

    @abstractmethod
    def size(self, kind: str, object_id: str) -> int:
        """Bytes the object's files hold (0 if it does not exist)."""

    @abstractmethod
    def local_folder(self, kind: str, object_id: str) -> Path:
        """A local folder holding the object's files, for readers that page through them
        (routing.paging reads tensors by byte offset); NotFound if there is no such object."""

    @abstractmethod
    def clean_staging(self) -> None:
        """Remove what interrupted puts and deletes left behind (at start)."""


class DiskObjects(Objects):
    """Objects as folders `<root>/<kind>/<id>/`, each appearing by one atomic rename."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _folder(self, kind: str, object_id: str) -> Path:
        _check(kind, object_id)
        return self.root / kind / object_id

    def put(self, kind: str, object_id: str, files: Mapping[str, bytes]) -> bool:
        target = self._folder(kind, object_id)
        if target.is_dir():
            return False
        staging = self._staging()
        try:
            for name, data in files.items():
                if "/" in name or name.startswith("."):
                    raise InvalidArgument(f"object file name {name!r} must be a plain name",
                                          field="files")
                (staging / name).write_bytes(data)
            return self._commit(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def put_folder(self, kind: str, object_id: str, folder: Path) -> bool:
        """Rename the folder into place (same file system), after fsyncing its files."""
        target = self._folder(kind, object_id)
        if target.is_dir():
            return False
        for child in folder.iterdir():
            fsync_path(child)
        return self._commit(folder, target)

    def _commit(self, staged: Path, target: Path) -> bool:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, target)
        except OSError:
            if target.is_dir():  # another writer put the same content first
                return False
            raise
        fsync_path(target.parent)
        return True

    def _staging(self) -> Path:
        base = self.root / _STAGING
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def get(self, kind: str, object_id: str) -> dict[str, bytes]:
        folder = self.local_folder(kind, object_id)
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    def exists(self, kind: str, object_id: str) -> bool:
        return self._folder(kind, object_id).is_dir()

    def list(self, kind: str) -> list[str]:
        _check(kind, "0")
        folder = self.root / kind
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def delete(self, kind: str, object_id: str) -> int:
        folder = self._folder(kind, object_id)
        freed = self.size(kind, object_id)
        if folder.is_dir():
            # rename first: a reader never sees a half-deleted object under its id
            doomed = self._staging() / "doomed"
            os.rename(folder, doomed)
            shutil.rmtree(doomed.parent, ignore_errors=True)
        return freed

    def size(self, kind: str, object_id: str) -> int:
        folder = self._folder(kind, object_id)
        return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0

    def local_folder(self, kind: str, object_id: str) -> Path:
        folder = self._folder(kind, object_id)
        if not folder.is_dir():
            raise NotFound(f"no {kind} object {object_id[:16]}... in {self.root}: the store "
                           "was changed on disk or the object was pruned", field=kind)
        return folder

    def clean_staging(self) -> None:
        shutil.rmtree(self.root / _STAGING, ignore_errors=True)


def _check(kind: str, object_id: str) -> None:
    if kind not in KINDS:
        raise InvalidArgument(f"object kind {kind!r} is not one of {KINDS}", field="kind")
    if not object_id or not all(c in "0123456789abcdef" for c in object_id):
        raise InvalidArgument(f"object id {object_id[:40]!r} is not a lowercase hex content "
                              "address", field="object_id")
