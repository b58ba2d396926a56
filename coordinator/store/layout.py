"""Where everything of a coordinator lives on disk: one `Layout` per store folder.

A store folder holds::

    index.sqlite              contributors, tokens, experts, uploads (coordinator.store.experts)
    base.json                 the federation's BaseSpec, cached so the server starts fast
    experts/<expert_id>/      one validated bundle per expert (protocol.bundle layout), and
    keys/<expert_id>/         its key shard (routing.keys): the store's content-addressed
                              objects (coordinator.store.objects), each stored once
    uploads/<upload_id>.part  bytes of an upload in progress (coordinator.intake.uploads)
    staging/<upload_id>/      an upload being unpacked and validated
    versions/<version_id>/    one immutable router version (coordinator.store.versions):
        version.json          its manifest: experts by id, parent, base, diff
        usage.json, *.png     its usage check and pictures (coordinator.checks.usage)
    versions/CURRENT, CHAMPION, promotions.jsonl   the pointers and the promotion log
    evaluations/              evaluation config and records (coordinator.checks.evaluation)
    tracking/                 the queue of MLflow calls (coordinator.tracking.queue)
    mlflow/                   the embedded MLflow store, when no --tracking-uri is given

Every module asks the layout for its folder instead of joining names onto a path itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from protocol.bundle import fsync_path
from protocol.errors import NotFound

INDEX = "index.sqlite"


@dataclass(frozen=True)
class Layout:
    """The folders and files of one store folder (none is created here)."""

    root: Path

    @classmethod
    def of(cls, where: Layout | str | os.PathLike) -> Layout:
        """A Layout, from a Layout or the store folder's path."""
        return where if isinstance(where, Layout) else cls(Path(where))

    @property
    def index(self) -> Path:
        return self.root / INDEX

    @property
    def base_spec(self) -> Path:
        return self.root / "base.json"

    @property
    def experts(self) -> Path:
        return self.root / "experts"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    @property
    def evaluations(self) -> Path:
        return self.root / "evaluations"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    def exists(self) -> bool:
        """Whether a store was ever opened here (its index is there)."""
        return self.index.is_file()

    def require(self) -> Layout:
        """This layout when a store exists here; NotFound, creating nothing, otherwise.

        Opening a `Store` creates one where there is none, which only `serve` and `token add`
        should do: for every other command a mistyped --store must fail, not list an empty one.
        """
        if not self.exists():
            reason = f"it holds no {INDEX}" if self.root.is_dir() else "no such folder"
            raise NotFound(f"no gaggle store at {self.root} ({reason}): check --store, or "
                           f"start one with gaggle-coordinator serve --store {self.root}",
                           field="store")
        return self


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` durably: a reader, or a restart after a crash, sees the old bytes or
    the new ones, whole (temporary file, fsync, rename, fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def link_or_copy(source: Path, target: Path) -> None:
    """`target` with the bytes of the immutable file `source`: a hard link (no second copy of
    the bytes) where both are on one file system, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
