"""The coordinator's Ray work on a real two-node cluster whose worker node cannot see the store.

Proof that no Ray task or actor reads the coordinator's disk: the store lives under a folder
that, in the worker node's mount namespace, is covered by an empty tmpfs
(tests/harness/raycluster.py), and the head node has no CPUs, so every assembly task and
evaluation actor runs on the worker node (pinned there by its custom resource too). A task
that opened a store path would find nothing there and the assembly would fail; it passes only
when the bundle bytes and the router travel through Ray's object store. Drivers join both
ways: HOST:PORT and Ray Client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from coordinator.checks.evaluation import read_evaluation
from coordinator.store.versions import VersionStore
from protocol.bundle import load_bundle
from routing.keys import KEY_FIELDS
from routing.stack import stack_experts
from tests.harness.raycluster import RESOURCE, LocalCluster, can_hide_folders
from tests.harness.stores import add_expert, make_store

_CANNOT_HIDE = can_hide_folders()
pytestmark = pytest.mark.skipif(_CANNOT_HIDE is not None,
                                reason=f"the worker node cannot be kept from the store: "
                                       f"{_CANNOT_HIDE}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    hidden = tmp_path_factory.mktemp("coordinator-only")
    started = LocalCluster(hidden).start()
    yield started
    started.stop()


def coordinator(*args: str) -> subprocess.CompletedProcess:
    """`gaggle-coordinator ARGS` as its own process (a driver joining the cluster)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env,
                          capture_output=True, text=True, timeout=240)


def filled_store(root, spec) -> list:
    store = make_store(root, spec)
    records = [add_expert(store, spec, "a", 1), add_expert(store, spec, "b", 2, method="ia3"),
               add_expert(store, spec, "c", 3, contributor="bob")]
    store.close()
    return records


def hidden_from_worker(cluster: LocalCluster) -> str:
    """What a process in a mount namespace like the worker node's lists in the store's parent
    folder (the worker node's own namespace is not reachable from here)."""
    seen = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs x {cluster.hidden} && ls -A {cluster.hidden}"],
                          capture_output=True, text=True, check=True)
    return seen.stdout


def test_assembly_and_evaluation_run_on_a_node_that_cannot_see_the_store(cluster, tiny_spec,
                                                                          tmp_path):
    root = cluster.hidden / "store"
    records = filled_store(root, tiny_spec)
    assert hidden_from_worker(cluster) == "" and (root / "experts").is_dir()
    pinned = ("--ray-resource", f"{RESOURCE}=1", "--tracking-uri", "http://127.0.0.1:9")
    done = coordinator("assemble", "--store", str(root), "--ray-address",
                       cluster.client_address, *pinned)  # Ray Client
    assert done.returncode == 0, done.stdout + done.stderr + cluster.server_logs()
    assert "3 experts" in done.stdout

    version_id = VersionStore(root).current_id()
    built = VersionStore(root).router(version_id, fields=KEY_FIELDS)
    local = stack_experts([load_bundle(root / "experts" / r.expert_id) for r in records])
    assert built.experts == ["alice/a", "alice/b", "bob/c"]
    for name, module in local.modules.items():  # the key shards the worker built
        for field in ("keys", "prototypes"):
            assert getattr(module, field).sort(dim=0).values.allclose(
                getattr(built.modules[name], field).sort(dim=0).values)

    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"tasks": ["openbookqa"], "examples_per_task": 4,
                                  "batch_size": 4}))
    done = coordinator("evaluate", version_id, "--store", str(root), "--eval-config",
                       str(config), "--ray-address", cluster.address, *pinned)  # HOST:PORT
    assert done.returncode == 0, done.stdout + done.stderr
    record = read_evaluation(root, version_id)
    assert record["n_examples"] == {"openbookqa": 4}
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
