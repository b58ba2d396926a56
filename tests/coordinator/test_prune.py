"""`prune`: removes old versions and what only they held, in the store and in MLflow, and never
anything a kept version (newest, current, champion) or the present expert set needs."""

from __future__ import annotations

import pytest
import torch

from coordinator.checks.usage import version_usage
from coordinator.cli import main
from coordinator.store.versions import VersionStore
from coordinator.tracking.names import REGISTERED_MODEL
from coordinator.tracking.tracker import Tracker, default_tracking_uri
from coordinator.versions.assemble import assemble
from coordinator.versions.prune import plan_prune
from coordinator.versions.record import queue_untracked
from routing.router import route, unroute
from routing.version import KEYS_DIR
from tests.harness.stores import add_expert, make_store

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture
def history(tmp_path, tiny_spec):
    """v1 {a, b}, v2 {a2, b} (alice replaced a), v3 {a2, b, c} champion, v4 {a2, b, c, d}
    current; all tracked into the embedded MLflow."""
    store = make_store(tmp_path / "store", tiny_spec)
    experts = {"a": add_expert(store, tiny_spec, "a", seed=1),
               "b": add_expert(store, tiny_spec, "b", seed=2, contributor="bob")}
    ids = [assemble(store, store.list_experts()).version_id]
    for name, seed in (("a", 3), ("c", 4), ("d", 5)):
        experts[name if name != "a" else "a2"] = add_expert(store, tiny_spec, name, seed=seed)
        ids.append(assemble(store, store.list_experts()).version_id)
    versions = VersionStore(store.layout)
    for version_id in ids:  # checked, as the serving coordinator checks every version
        version_usage(versions, version_id)
    tracker = Tracker(store.root)
    queue_untracked(store.list_experts(), versions, tracker)
    assert tracker.replay().pending == 0
    assert main(["promote", ids[2], "--store", str(store.root)]) == 0
    return store, ids, experts


def _store_files(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and "mlflow" not in p.parts and "tracking" not in p.parts}


def test_dry_run_says_what_would_go_and_changes_nothing(history, capsys):
    store, ids, experts = history
    before = _store_files(store.root)
    capsys.readouterr()
    assert main(["prune", "--keep-last", "1", "--dry-run", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would keep 2 versions; remove 2 versions, 1 key shards and 1 ")
    assert ids[0] in out and ids[1] in out and ids[2] not in out
    assert _store_files(store.root) == before


def test_prune_keeps_what_kept_versions_need_and_removes_the_rest(history, tiny_base, capsys):
    from mlflow import MlflowClient

    store, ids, experts = history
    plan = plan_prune(store, keep_last=1)
    assert plan.kept == [ids[2], ids[3]] and plan.versions == ids[:2]
    replaced = experts["a"].expert_id  # only v1 held it: alice replaced it in v2
    assert plan.keys == [replaced] and plan.experts == [replaced]
    assert plan.freed["experts"] == store.objects.size("experts", replaced)

    assert main(["prune", "--keep-last", "1", "--store", str(store.root)]) == 0
    versions = VersionStore(store.layout)
    assert [m.version_id for m in versions.all()] == ids[2:]
    assert not store.objects.exists("experts", replaced)
    assert not store.objects.exists(KEYS_DIR, replaced)
    assert replaced not in {e.expert_id for e in store.list_experts()}
    for name in ("a2", "b", "c", "d"):  # everything the kept versions refer to is there
        assert store.objects.exists("experts", experts[name].expert_id)
        assert store.objects.exists(KEYS_DIR, experts[name].expert_id)
    tokens = torch.tensor([[3, 4, 5, 6]])
    for version_id in ids[2:]:  # champion and current still route
        route(tiny_base, versions.router(version_id))
        with torch.inference_mode():
            assert torch.isfinite(tiny_base.model(tokens).logits).all()
        unroute(tiny_base.model)

    uri = default_tracking_uri(store.root)
    client = MlflowClient(uri, uri)
    tracked = {mv.tags["gaggle.version_id"]
               for mv in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")}
    assert tracked == set(ids[2:])
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert champion.tags["gaggle.version_id"] == ids[2]
    (run,) = client.search_runs(
        [client.get_experiment_by_name("gaggle").experiment_id],
        filter_string=f"tags.expert_id = '{replaced}'")
    assert client.list_artifacts(run.info.run_id) == []  # its files went, its run stays
    assert run.data.metrics  # ... with its training figures

    capsys.readouterr()  # pruning again finds nothing more
    assert main(["prune", "--keep-last", "1", "--store", str(store.root)]) == 0
    assert "remove 0 versions, 0 key shards and 0" in capsys.readouterr().out


def test_keep_last_must_be_positive(history):
    store, _, _ = history
    assert main(["prune", "--keep-last", "0", "--store", str(store.root)]) == 2
