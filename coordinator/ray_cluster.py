"""Where the coordinator's Ray work runs: a local Ray on 127.0.0.1, or a cluster it joins.

Assembly tasks and evaluation actors both start Ray through `ensure_ray`, once per process,
and ask for the same custom resources (`RayConfig.ray_options`), so an operator pins both to
the nodes started with those resources. Ray workers never open the store: the driver reads
a stored folder's files (`folder_files`) and sends their bytes through Ray's object store.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from protocol.errors import InvalidArgument, InvalidBundle

SHM = "/dev/shm"
log = logging.getLogger(__name__)
_RAY_LOCK = threading.Lock()


@dataclass(frozen=True)
class RayConfig:
    """Where Ray runs; the defaults suit a laptop."""

    ray_address: str | None = None  # join this Ray cluster; None starts a local one
    num_cpus: int = 2  # CPUs of the local Ray instance (ignored with ray_address)
    # Custom Ray resources every assembly task and evaluation actor asks for, as (name,
    # amount) pairs: they pin that work to the nodes started with `--resources` naming them.
    resources: tuple[tuple[str, float], ...] = ()

    def ray_options(self) -> dict:
        """`.options(...)` for this coordinator's Ray tasks and actors."""
        return {"resources": dict(self.resources)} if self.resources else {}


def parse_resources(specs: list[str] | tuple[str, ...] | None) -> tuple[tuple[str, float], ...]:
    """`--ray-resource NAME=AMOUNT` values as RayConfig.resources pairs."""
    pairs = []
    for spec in specs or ():
        name, _, amount = str(spec).partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not name.strip() or not value > 0:
            raise InvalidArgument(f"Ray resource {spec!r} must be NAME=AMOUNT with a positive "
                                  "amount, e.g. gaggle_worker=1", field="ray_resources")
        pairs.append((name.strip(), value))
    return tuple(pairs)


def ensure_ray(config: RayConfig | None = None) -> None:
    """Start (or join) Ray once per process, on loopback unless an address is given."""
    config = config or RayConfig()
    with _RAY_LOCK:
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # quiet about tokens
        if config.ray_address:  # HOST:PORT, or ray://HOST:PORT through Ray Client
            _join(config.ray_address)
            return
        # A local Ray binds 127.0.0.1 only: Ray's default multi-node mode would listen on
        # every interface. Joining a cluster must not force it: the cluster reaches this
        # driver at the address Ray finds for it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # address="local": a Ray of this process's own. Without it ray.init joins the newest
        # cluster `ray start` left on the machine (or RAY_ADDRESS), even one that has since
        # stopped, and refuses num_cpus there: a coordinator that never assembles.
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False,
                 log_to_driver=False)


def shutdown_ray() -> None:
    """Stop this process's Ray (a local one ends with its processes; a cluster joined is
    only left). Safe to call when Ray never started."""
    with _RAY_LOCK:
        if ray.is_initialized():
            ray.shutdown()


def _join(address: str, attempts: int = 3) -> None:
    """ray.init on an existing cluster. Ray Client's server starts one process per driver and
    on a busy head that start sometimes fails (ConnectionAbortedError); a new connection
    gets a new process, so try again a few times before giving up."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except ConnectionAbortedError as err:
            if attempt == attempts or not address.startswith("ray://"):
                raise
            log.warning("Ray Client at %s refused this driver (%s); trying again", address,
                        str(err).strip().splitlines()[-1][:200])
            time.sleep(attempt)


def folder_files(path: str | os.PathLike, what: str = "expert folder") -> dict[str, bytes]:
    """The files of a stored folder (a bundle, a router), as bytes: what travels to Ray."""
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidBundle(f"{what} {folder} is missing from the store: the store was "
                            "changed on disk", field="path")
    return {child.name: child.read_bytes() for child in sorted(folder.iterdir())
            if child.is_file()}


def scratch_dir(size: int) -> str | None:
    """Memory-backed /dev/shm when it has room for `size` bytes (several times faster than a
    disk for thousands of small files), else the default temp folder (None)."""
    try:
        if shutil.disk_usage(SHM).free > 4 * size + (64 << 20) and os.access(SHM, os.W_OK):
            return SHM
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class ShippedVersion:
    """A router version as it travels to a Ray worker that cannot see the store: its manifest
    and, per expert, object refs to its key shard and bundle files. Refs inside a dataclass
    are not resolved when the task starts: the worker fetches a bundle only when a token
    first picks that expert (`open_shipped`). A format-1 version ships its stacked router."""

    manifest: dict
    keys: dict[str, object] = field(default_factory=dict)  # expert id -> ref of its files
    bundles: dict[str, object] = field(default_factory=dict)
    stacked: object | None = None  # ref of a format-1 version's router/ files


class Shipper:
    """Puts each expert's files into Ray's object store once, for every version after it
    (refs of experts no longer in a version are dropped, freeing them)."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str, str], object] = {}

    def ship(self, versions, version_id: str) -> ShippedVersion:
        """versions: the store's coordinator.store.versions.VersionStore."""
        from routing.version import EXPERTS_DIR, KEYS_DIR, STACKED_DIR

        manifest = versions.manifest(version_id)
        if manifest.format == 1:
            files = folder_files(versions.folder(version_id) / STACKED_DIR, "router folder")
            return ShippedVersion(manifest.to_json(), stacked=ray.put(files))
        wanted = {(kind, i) for i in manifest.expert_ids for kind in (KEYS_DIR, EXPERTS_DIR)}
        self._refs = {key: ref for key, ref in self._refs.items() if key in wanted}
        for kind, expert_id in sorted(wanted - set(self._refs)):
            self._refs[(kind, expert_id)] = ray.put(versions.objects.get(kind, expert_id))
        return ShippedVersion(
            manifest.to_json(),
            keys={i: self._refs[(KEYS_DIR, i)] for i in manifest.expert_ids},
            bundles={i: self._refs[(EXPERTS_DIR, i)] for i in manifest.expert_ids})


def open_shipped(shipped: ShippedVersion, scratch: Path, max_adapter_bytes: int):
    """On a worker: the RouterWeights of a shipped version, its files written under
    `scratch` as they are fetched (keys at once, each bundle on first use)."""
    from routing.version import KEY_FILE, VersionManifest, load_stacked, open_router

    def written(refs: dict, kind: str, expert_id: str) -> Path:
        folder = scratch / kind / expert_id
        if not folder.is_dir():
            staging = scratch / f".{kind}-{expert_id}"
            staging.mkdir(parents=True, exist_ok=True)
            for name, data in ray.get(refs[expert_id]).items():
                (staging / name).write_bytes(data)
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(folder)
        return folder

    if shipped.stacked is not None:
        folder = scratch / "router"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in ray.get(shipped.stacked).items():
            (folder / name).write_bytes(data)
        return load_stacked(folder)
    manifest = VersionManifest.from_json(shipped.manifest)
    return open_router(manifest, max_adapter_bytes=max_adapter_bytes,
                       key_shard=lambda i: written(shipped.keys, "keys", i) / KEY_FILE,
                       bundle=lambda i: written(shipped.bundles, "experts", i))
