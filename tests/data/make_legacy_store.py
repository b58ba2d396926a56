# ruff: noqa: E402, I001
"""How tests/data/legacy-store.tar.gz was made: a store written by gaggle before versions went
by reference (commit 8107771), whose two versions hold stacked routers, v1 the champion and
v2 current, with its tracking calls still queued (no MLflow was reachable).

    git worktree add /tmp/old 8107771
    python tests/data/make_legacy_store.py /tmp/legacy/store /tmp/old
    tar czf tests/data/legacy-store.tar.gz -C /tmp/legacy store
"""
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[2])  # a checkout of that commit
from coordinator.ray_cluster import ensure_ray
from coordinator.versions.assemble import assemble
from coordinator.versions.scheduler import queue_untracked
from coordinator.store.versions import VersionStore
from coordinator.tracking.tracker import Tracker
from routing.base import load_base
from tests.harness.stores import add_expert, make_store

root = Path(sys.argv[1])
spec = load_base("tiny-llama").spec()
store = make_store(root, spec)
ensure_ray()
add_expert(store, spec, "a", seed=1)
add_expert(store, spec, "b", seed=2, method="ia3", contributor="bob")
v1 = assemble(store.root, store.list_experts(), None, spec.fingerprint, spec.name)
add_expert(store, spec, "c", seed=3)
v2 = assemble(store.root, store.list_experts(), None, spec.fingerprint, spec.name)
versions = VersionStore(store.root)
versions.promote(v1.version_id)
tracker = Tracker(store.root, "http://127.0.0.1:9")  # unreachable: calls stay queued
queue_untracked(store.list_experts(), versions, tracker)
print(v1.version_id, v2.version_id)
