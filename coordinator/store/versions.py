"""Router versions on disk: immutable folders under `<store>/versions/`, the CURRENT and
CHAMPION pointers, and the expert-level comparison of two version manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from coordinator.store.layout import Layout, atomic_write
from protocol.bundle import fsync_path
from protocol.errors import AlreadyExists, InvalidArgument, NotFound
from protocol.names import preview
from routing.stack import RouterWeights
from routing.version import load_router

VERSION_FILE = "version.json"
ROUTER_DIR = "router"
CURRENT = "CURRENT"
CHAMPION = "CHAMPION"
PROMOTIONS = "promotions.jsonl"
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
    """The version folders of one coordinator store."""

    def __init__(self, store: Layout | str | os.PathLike) -> None:
        self.root = Layout.of(store).versions
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, version_id: str) -> Path:
        return self.root / version_id

    def exists(self, version_id: str) -> bool:
        return (self.folder(version_id) / VERSION_FILE).is_file()

    def manifest(self, version_id: str) -> dict:
        path = self.folder(version_id) / VERSION_FILE
        if not path.is_file():
            raise NotFound(f"no router version {preview(version_id)}: list them with "
                           "`gaggle-coordinator versions`", field="version")
        return json.loads(path.read_text(encoding="utf-8"))

    def all(self) -> list[dict]:
        """Every version manifest, oldest first."""
        found = [json.loads(p.read_text(encoding="utf-8"))
                 for p in self.root.glob(f"*/{VERSION_FILE}")]
        return sorted(found, key=lambda m: (m.get("created_at_unix", 0.0), m["created_at"],
                                            m["version_id"]))

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

    def commit(self, version_id: str, write: Callable[[Path], None]) -> Path:
        """Create a version folder atomically: `write` fills a staging folder, then a rename."""
        target = self.folder(version_id)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version_id}.", dir=self.root))
        try:
            write(staging)
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

    def promote(self, version_id: str) -> int:
        """Make a version the champion; returns the promotion's sequence number."""
        if not VERSION_ID_RE.fullmatch(version_id) or not self.exists(version_id):
            raise NotFound(f"no router version {preview(version_id)}: resolve it first",
                           field="version")
        log = self.root / PROMOTIONS
        with open(log, "a+", encoding="utf-8") as handle:
            handle.seek(0)
            sequence = sum(1 for line in handle if line.strip()) + 1
            handle.write(json.dumps({"sequence": sequence, "version_id": version_id}) + "\n")
        self._write_pointer(CHAMPION, version_id)
        return sequence

    def export(self, version: str, out: str | os.PathLike) -> tuple[str, RouterWeights]:
        """Copy version `version` (an id or a unique prefix) to a new folder `out` that
        `routing.version.load_router` reads alone; returns (version id, its router). The
        folder appears whole or not at all: it is read back before it gets its name."""
        version_id = self.resolve(version)
        out = Path(out)
        if out.exists():
            raise AlreadyExists(f"--out {out} already exists: choose a new folder", field="out")
        staging = out.with_name(f".{out.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(self.folder(version_id) / ROUTER_DIR, staging)
        shutil.copy2(self.folder(version_id) / VERSION_FILE, staging / VERSION_FILE)
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


def expert_changes(old: dict | None, new: dict) -> dict[str, list]:
    """Experts added, removed and changed (same name, new content) between two manifests.

    Returns {"added": [name], "removed": [name], "changed": [(name, old_id, new_id)]}.
    """
    before = {e["name"]: e for e in (old or {}).get("experts", [])}
    after = {e["name"]: e for e in new["experts"]}
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": [(name, before[name]["expert_id"], after[name]["expert_id"])
                    for name in sorted(set(before) & set(after))
                    if before[name]["expert_id"] != after[name]["expert_id"]],
    }


def one_line_diff(old: dict | None, new: dict) -> str:
    """`+added ~changed -removed` in one line, for a model version tag."""
    changes = expert_changes(old, new)
    words = ([f"+{n}" for n in changes["added"]] + [f"~{n}" for n, _, _ in changes["changed"]]
             + [f"-{n}" for n in changes["removed"]])
    return " ".join(words) if words else "no expert changes"
