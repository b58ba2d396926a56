"""Chaos: submissions while the coordinator is killed with SIGKILL at random moments and
restarted, then a full audit of the store and of MLflow. Used by tests/e2e/test_chaos.py and
bench/chaos.py.

The coordinator runs as in production: assembly on Ray after each accepted expert, tracking
into the embedded MLflow store. A submitter thread sends distinct bundles one after another
through `CoordinatorClient.submit` (which resumes after dropped connections); an expert is
acknowledged when submit returns its id. A killer thread SIGKILLs the server at a random
moment after each restart. Finally the coordinator runs undisturbed until the current version
holds every expert and the tracking queue is drained, and is stopped.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from contributor.client import Connection, CoordinatorClient, RetryPolicy
from protocol.bundle import BaseSpec, load_bundle, save_bundle
from routing.synthetic import random_bundle
from tests.harness.servers import add_token, restart, seed_base_spec, start_coordinator

RETRY = RetryPolicy(attempts=40, first_delay_s=0.3, max_delay_s=2.0)


@dataclass
class ChaosResult:
    acknowledged: dict[str, str] = field(default_factory=dict)  # bundle name -> expert id
    kills: int = 0
    kill_moments: list[float] = field(default_factory=list)  # seconds after each restart
    client_retries: int = 0  # submits that failed (e.g. server down at the compatibility
    # check, which submit does not retry) and were started again
    port_waits: int = 0  # restarts that found the port still taken and tried again
    settle_s: float = 0.0  # time for assembly and tracking to catch up after the last kill
    problems: list[str] = field(default_factory=list)  # audit failures; empty when all holds
    audit: dict[str, int] = field(default_factory=dict)  # counts the audit saw


def run_chaos(root: Path, spec: BaseSpec, submissions: int, kills: int, seed: int = 0,
              kill_window_s: tuple[float, float] = (0.5, 4.0),
              settle_timeout_s: float = 300.0, assembly: bool = True,
              rate: float = 500_000.0) -> ChaosResult:
    """Submit `submissions` bundles while killing the coordinator `kills` times; audit.

    assembly=False runs the coordinator with --no-assembly: only the store is audited.
    rate: bytes per second each upload is paced to; bundles span two 1 MiB chunks, so that
    kills land in the middle of uploads as well as between them."""
    rng = random.Random(seed)
    folders = [save_bundle(random_bundle(spec, f"chaos-{i}", seed=seed * 1000 + i, rank=260),
                           root / "bundles" / f"b{i}") for i in range(submissions)]
    seed_base_spec(root / "store", spec)
    token = add_token(root / "store", "chaos")
    server = start_coordinator(root / "store", log_path=root / "coordinator.log",
                               extra_args=() if assembly else ("--no-assembly",))
    result = ChaosResult()
    done = threading.Event()
    holder = {"server": server}

    def submit_all() -> None:
        for folder in folders:
            while True:
                try:
                    with CoordinatorClient(Connection(holder["server"].address, token,
                                                      timeout_s=30)) as client:
                        submitted = client.submit(folder, retry=RETRY, limit_rate=rate)
                    result.acknowledged[folder.name] = submitted.expert_id
                    break
                except Exception:
                    result.client_retries += 1
                    time.sleep(0.5)
        done.set()

    submitter = threading.Thread(target=submit_all, name="chaos-submitter")
    submitter.start()
    try:
        while result.kills < kills and not done.is_set():
            moment = rng.uniform(*kill_window_s)
            if done.wait(moment):
                break
            holder["server"].kill()
            result.kills += 1
            result.kill_moments.append(round(moment, 2))
            holder["server"] = _restart(holder["server"], result)
        submitter.join()
        began = time.monotonic()
        if assembly:
            settled = wait_settled(root / "store", set(result.acknowledged.values()),
                                   settle_timeout_s)
            if not settled:
                result.problems.append(f"not settled in {settle_timeout_s} s: "
                                       f"{settled.reason}")
        result.settle_s = time.monotonic() - began
    finally:
        done.set()
        submitter.join(5)
        code = holder["server"].stop(timeout=60)
    if code != 0:
        result.problems.append(f"the coordinator exited with {code} on SIGTERM")
    audit_store(root / "store", spec, result)
    if assembly:
        audit_mlflow(root / "store", result)
    return result


def _restart(server, result: ChaosResult):
    """Restart on the same port; the port may still be held a moment after the kill (for
    instance by a reconnecting client whose ephemeral port hit it), so try a few times."""
    for attempt in range(40):
        try:
            return restart(server)
        except RuntimeError as err:
            if "Address already in use" not in str(err) or attempt == 39:
                raise
            result.port_waits += 1
            time.sleep(0.5)
    raise AssertionError("unreachable")


class _Settled:
    def __init__(self, ok: bool, reason: str = "") -> None:
        self.ok, self.reason = ok, reason

    def __bool__(self) -> bool:
        return self.ok


def wait_settled(store: Path, expert_ids: set[str], timeout_s: float) -> _Settled:
    """Until CURRENT holds exactly `expert_ids`, its tracking call is queued, and no
    tracking call is pending."""
    from coordinator.store.versions import VersionStore
    from coordinator.tracking.queue import OpQueue

    deadline = time.monotonic() + timeout_s
    reason = "no version yet"
    while time.monotonic() < deadline:
        try:
            versions = VersionStore(store)
            current = versions.current_id()
            if current:
                have = set(versions.manifest(current).expert_ids)
                queue = OpQueue(store / "tracking")
                pending = queue.counts()["pending"]
                # CURRENT moves before the version's tracking call is queued: wait for it.
                if have == expert_ids and pending == 0 and queue.has(f"version:{current}"):
                    return _Settled(True)
                reason = f"current version has {len(have)} experts, {pending} calls wait"
        except Exception as err:  # a file mid-replacement, a locked queue: look again
            reason = f"{type(err).__name__}: {err}"
        time.sleep(1.0)
    return _Settled(False, reason)


def audit_store(store: Path, spec: BaseSpec, result: ChaosResult) -> None:
    """Every acknowledged expert is indexed and verifies; nothing partial or orphaned."""
    with sqlite3.connect(store / "index.sqlite") as conn:
        indexed = {row[0] for row in conn.execute("SELECT expert_id FROM experts")}
        open_uploads = conn.execute("SELECT COUNT(*) FROM uploads").fetchone()[0]
    folders = {p.name for p in (store / "experts").iterdir()}
    problems = result.problems
    for name, expert_id in result.acknowledged.items():
        if expert_id not in indexed:
            problems.append(f"acknowledged {name} ({expert_id[:12]}) is not indexed")
            continue
        try:
            if load_bundle(store / "experts" / expert_id, spec).expert_id != expert_id:
                problems.append(f"{name}: folder content is not expert {expert_id[:12]}")
        except Exception:
            problems.append(f"{name} does not verify: {traceback.format_exc(limit=1)}")
    if folders != indexed:
        problems.append(f"expert folders and index disagree: {sorted(folders ^ indexed)}")
    (store / "versions").mkdir(exist_ok=True)  # absent when the coordinator never assembled
    leftovers = [p.name for p in (store / "staging").iterdir()] + \
        [p.name for p in (store / "uploads").iterdir()] + \
        [p.name for p in (store / "versions").glob(".staging-*")]
    if leftovers or open_uploads:
        problems.append(f"partial files left: {leftovers}, open uploads: {open_uploads}")
    versions = [p for p in (store / "versions").iterdir() if p.is_dir()]
    for version in versions:
        if not (version / "version.json").is_file() or not (version / "router").is_dir():
            problems.append(f"version folder {version.name} is incomplete")
    result.audit.update(indexed=len(indexed), versions=len(versions))


def audit_mlflow(store: Path, result: ChaosResult) -> None:
    """MLflow holds exactly one finished run per stored expert and one model version per
    version folder, and the tracking queue has nothing pending or failed."""
    from mlflow import MlflowClient

    from coordinator.tracking.queue import OpQueue
    from coordinator.tracking.tracker import EXPERIMENT, REGISTERED_MODEL, default_tracking_uri

    uri = default_tracking_uri(store)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with sqlite3.connect(store / "index.sqlite") as conn:
        indexed = sorted(row[0] for row in conn.execute("SELECT expert_id FROM experts"))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=10_000) \
        if experiment else []
    tracked = sorted(r.data.tags.get("expert_id") for r in runs
                     if r.data.tags.get("expert_id"))
    unfinished = [r.info.run_id for r in runs if r.info.status != "FINISHED"]
    if tracked != indexed:
        result.problems.append(f"MLflow runs {len(tracked)} vs stored experts {len(indexed)}")
    if unfinished:
        result.problems.append(f"{len(unfinished)} MLflow runs not FINISHED")
    folders = sorted(p.name for p in (store / "versions").iterdir() if p.is_dir()
                     and not p.name.startswith("."))
    model_versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    registered = sorted(mv.tags.get("gaggle.version_id") for mv in model_versions)
    if registered != folders:
        result.problems.append(f"MLflow model versions {registered} vs folders {folders}")
    flagged = [mv for mv in model_versions if "usage.shares" not in mv.tags]
    if flagged:
        result.problems.append(f"{len(flagged)} model versions lack usage.* tags")
    counts = OpQueue(store / "tracking").counts()
    if counts["pending"] or counts["failed"]:
        result.problems.append(f"tracking queue: {counts}")
    result.audit.update(mlflow_runs=len(runs), model_versions=len(model_versions),
                        queue_done=counts["done"])
