"""Router versions on disk: immutable folders under `<store>/versions/` that refer to their
experts by id, the CURRENT and CHAMPION pointers, and the expert-level comparison of two
version manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from coordinator.store.layout import Layout, atomic_write, link_or_copy
from coordinator.store.objects import DiskObjects, Objects
from protocol.bundle import fsync_path
from protocol.errors import AlreadyExists, InvalidArgument, NotFound
from protocol.names import preview
from routing.paging import DEFAULT_MAX_BYTES
from routing.stack import RouterWeights
from routing.version import (
    EXPERTS_DIR,
    KEY_FILE,
    KEYS_DIR,
    STACKED_DIR,
    VERSION_FILE,
    VersionManifest,
    load_router,
    load_stacked,
    open_router,
)

CURRENT = "CURRENT"
CHAMPION = "CHAMPION"
PROMOTIONS = "promotions.jsonl"
REJECTED = "rejected.json"  # in a version's folder: it failed its checks (why, whom)
# fullmatch, not match: "$" also matches before a final newline.
VERSION_ID_RE = re.compile(r"[0-9a-f]{16}")  # coordinator.versions.assemble.version_id_for
_PREFIX_RE = re.compile(r"[0-9a-f]{1,16}")


def check_version_ref(value: object) -> str:
    """A version id or a unique prefix of one, as the CLI and the Admin service take it;
    InvalidArgument otherwise, before the value comes near a path (it names a folder)."""
    if not isinstance(value, str) or not _PREFIX_RE.fullmatch(value):
        raise InvalidArgument(f"version {preview(value)} is not a version id: use the 16 "
                              "lowercase hex digits `gaggle-coordinator versions` lists, or a "
                              "unique prefix of them", field="version")
    return value


class VersionStore:
    """The version folders of one coordinator store.

    A version folder holds its version.json (routing.version.VersionManifest) and the reports
    of its checks; its experts' bundles and key shards are the store's objects
    (coordinator.store.objects), referred to by id. Folders of format 1 also hold a stacked
    copy of every expert (router/), which `router` still reads.
    """

    def __init__(self, store: Layout | str | os.PathLike,
                 objects: Objects | None = None) -> None:
        layout = Layout.of(store)
        self.root = layout.versions
        self.root.mkdir(parents=True, exist_ok=True)
        self.objects = objects or DiskObjects(layout.root)

    def folder(self, version_id: str) -> Path:
        return self.root / version_id

    def exists(self, version_id: str) -> bool:
        return (self.folder(version_id) / VERSION_FILE).is_file()

    def manifest(self, version_id: str) -> VersionManifest:
        path = self.folder(version_id) / VERSION_FILE
        if not path.is_file():
            raise NotFound(f"no router version {preview(version_id)}: list them with "
                           "`gaggle-coordinator versions`", field="version")
        return VersionManifest.read(path)

    def all(self) -> list[VersionManifest]:
        """Every version manifest, oldest first."""
        found = [VersionManifest.read(p) for p in self.root.glob(f"*/{VERSION_FILE}")]
        return sorted(found, key=lambda m: (m.created_at_unix, m.created_at, m.version_id))

    def resolve(self, prefix: str) -> str:
        """A full version id from a unique prefix (like a short git hash)."""
        check_version_ref(prefix)
        if self.exists(prefix):
            return prefix
        matches = [p.name for p in self.root.iterdir()
                   if p.name.startswith(prefix) and (p / VERSION_FILE).is_file()]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(f"no router version {prefix!r}: list them with "
                           "`gaggle-coordinator versions`", field="version")
        raise InvalidArgument(f"version prefix {prefix!r} is ambiguous: {sorted(matches)}",
                              field="version")

    def commit(self, manifest: VersionManifest) -> Path:
        """Create a version folder atomically: version.json in a staging folder, a rename.
        Its experts' objects must be stored already (the caller checks)."""
        version_id = manifest.version_id
        target = self.folder(version_id)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version_id}.", dir=self.root))
        try:
            (staging / VERSION_FILE).write_bytes(manifest.to_bytes())
            fsync_path(staging / VERSION_FILE)
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if self.exists(version_id):  # another process committed the same content first
                return target
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_path(self.root)
        return target

    def router(self, version_id: str, *, fields: Sequence[str] = ("keys",),
               max_adapter_bytes: int = DEFAULT_MAX_BYTES,
               shard_cache: dict | None = None) -> RouterWeights:
        """The version's router: its experts' keys in memory, their adapters paged in from
        the store's bundles (routing.version.open_router, `shard_cache` its cache of key
        shards); a format-1 version's stacked copy."""
        manifest = self.manifest(version_id)
        if manifest.format == 1:
            return load_stacked(self.folder(version_id) / STACKED_DIR)
        return open_router(
            manifest, fields=fields, max_adapter_bytes=max_adapter_bytes,
            shard_cache=shard_cache,
            key_shard=lambda i: self.objects.local_folder(KEYS_DIR, i) / KEY_FILE,
            bundle=lambda i: self.objects.local_folder(EXPERTS_DIR, i))

    def reject(self, version_id: str, reason: str, culprits: Sequence[str] = (), *,
               by: str = "checks") -> dict:
        """Record that a version failed its checks: it never goes current or live."""
        record = {"version_id": version_id, "reason": reason, "culprits": list(culprits),
                  "by": by, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write(self.folder(version_id) / REJECTED,
                     (json.dumps(record, indent=1) + "\n").encode())
        return record

    def rejection(self, version_id: str) -> dict | None:
        """Why a version was rejected, or None when it was not."""
        path = self.folder(version_id) / REJECTED
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def clean_staging(self) -> None:
        """Remove staging folders an interrupted assembly left behind."""
        for folder in self.root.glob(".staging-*"):
            shutil.rmtree(folder, ignore_errors=True)

    def current_id(self) -> str | None:
        return self._read_pointer(CURRENT)

    def set_current(self, version_id: str) -> None:
        self._write_pointer(CURRENT, version_id)

    def champion_id(self) -> str | None:
        return self._read_pointer(CHAMPION)

    def promote(self, version_id: str, *, forced: bool = False) -> int:
        """Make a version the champion; returns the promotion's sequence number. `forced`
        is recorded with it (a promotion past the rules: a rejected or worse version)."""
        if not VERSION_ID_RE.fullmatch(version_id) or not self.exists(version_id):
            raise NotFound(f"no router version {preview(version_id)}: resolve it first",
                           field="version")
        log = self.root / PROMOTIONS
        with open(log, "a+", encoding="utf-8") as handle:
            handle.seek(0)
            sequence = sum(1 for line in handle if line.strip()) + 1
            entry = {"sequence": sequence, "version_id": version_id}
            handle.write(json.dumps({**entry, "forced": True} if forced else entry) + "\n")
        self._write_pointer(CHAMPION, version_id)
        return sequence

    def export(self, version: str, out: str | os.PathLike) -> tuple[str, RouterWeights]:
        """Write version `version` (an id or a unique prefix) to a new folder `out` that
        `routing.version.load_router` reads alone: its version.json, and its experts' key
        shards and bundles (hard links where the file system allows, else copies). Returns
        (version id, its router). The folder appears whole or not at all: it is read back
        before it gets its name."""
        version_id = self.resolve(version)
        out = Path(out)
        if out.exists():
            raise AlreadyExists(f"--out {out} already exists: choose a new folder", field="out")
        staging = out.with_name(f".{out.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        manifest = self.manifest(version_id)
        if manifest.format == 1:
            shutil.copytree(self.folder(version_id) / STACKED_DIR, staging)
        else:
            for expert_id in manifest.expert_ids:
                for kind in (KEYS_DIR, EXPERTS_DIR):
                    source = self.objects.local_folder(kind, expert_id)
                    for child in source.iterdir():
                        link_or_copy(child, staging / kind / expert_id / child.name)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / VERSION_FILE).write_bytes(manifest.to_bytes())
        weights = load_router(staging)
        staging.rename(out)
        return version_id, weights

    def _read_pointer(self, name: str) -> str | None:
        try:
            value = (self.root / name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return value or None

    def _write_pointer(self, name: str, version_id: str) -> None:
        atomic_write(self.root / name, (version_id + "\n").encode())


def expert_changes(old: VersionManifest | None,
                   new: VersionManifest) -> dict[str, list]:
    """Experts added, removed and changed (same name, new content) between two manifests.

    Returns {"added": [name], "removed": [name], "changed": [(name, old_id, new_id)]}.
    """
    before = {e.name: e.expert_id for e in (old.experts if old else ())}
    after = {e.name: e.expert_id for e in new.experts}
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": [(name, before[name], after[name])
                    for name in sorted(set(before) & set(after))
                    if before[name] != after[name]],
    }


def one_line_diff(old: VersionManifest | None, new: VersionManifest) -> str:
    """`+added ~changed -removed` in one line, for a model version tag."""
    changes = expert_changes(old, new)
    words = ([f"+{n}" for n in changes["added"]] + [f"~{n}" for n, _, _ in changes["changed"]]
             + [f"-{n}" for n in changes["removed"]])
    return " ".join(words) if words else "no expert changes"
