"""A store written before versions went by reference (tests/data/legacy-store.tar.gz, made by
tests/data/make_legacy_store.py with that gaggle) still serves: its stacked versions route and
export, its queued tracking calls land, and the next version refers to its experts."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from coordinator.checks.usage import version_usage
from coordinator.cli import main
from coordinator.store.experts import Store
from coordinator.store.versions import VersionStore
from coordinator.tracking.names import REGISTERED_MODEL
from coordinator.tracking.tracker import Tracker, default_tracking_uri
from coordinator.versions.assemble import assemble
from coordinator.versions.diff import diff_versions
from coordinator.versions.record import queue_untracked
from protocol.bundle import load_bundle
from routing.router import route, unroute
from routing.stack import stack_experts
from routing.version import KEYS_DIR, load_router
from tests.harness.stores import add_expert

pytestmark = pytest.mark.usefixtures("ray_local")
LEGACY = Path(__file__).parents[1] / "data" / "legacy-store.tar.gz"
V1, V2 = "f71c9c7996261ef4", "0ea9bc5aa52a9487"  # champion, current


@pytest.fixture
def legacy(tmp_path, tiny_spec) -> Store:
    with tarfile.open(LEGACY) as archive:
        archive.extractall(tmp_path, filter="data")
    store = Store(tmp_path / "store", recover=True)
    assert store.cached_base_spec().fingerprint == tiny_spec.fingerprint
    return store


def logits(base, weights) -> torch.Tensor:
    route(base, weights)
    try:
        with torch.inference_mode():
            return base.model(torch.tensor([[7, 8, 9, 10, 11]])).logits
    finally:
        unroute(base.model)


def test_stacked_versions_still_route_diff_and_export(legacy, tiny_base, tmp_path):
    versions = VersionStore(legacy.layout)
    assert [m.version_id for m in versions.all()] == [V1, V2]
    assert all(m.format == 1 for m in versions.all())
    assert (versions.current_id(), versions.champion_id()) == (V2, V1)
    bundles = [load_bundle(legacy.bundle_folder(i)) for i in versions.manifest(V2).expert_ids]
    for bundle, name in zip(bundles, versions.manifest(V2).names, strict=True):
        bundle.manifest.name = name
    expected = logits(tiny_base, stack_experts(bundles))
    torch.testing.assert_close(logits(tiny_base, versions.router(V2)), expected)
    assert diff_versions(legacy.root, V1, V2).added == ["alice/c"]
    assert main(["export", V1, "--store", str(legacy.root), "--out", str(tmp_path / "v1")]) == 0
    assert load_router(tmp_path / "v1").experts == ["alice/a", "bob/b"]


def test_the_next_version_refers_to_the_old_experts_and_the_history_lands(legacy, tiny_spec,
                                                                           tiny_base):
    from mlflow import MlflowClient

    add_expert(legacy, tiny_spec, "d", seed=7, contributor="bob")
    result = assemble(legacy, legacy.list_experts())
    assert result.created and result.manifest.format == 2 and result.new_experts == 4
    versions = VersionStore(legacy.layout)
    assert result.manifest.parent == V2 and result.manifest.diff == "+bob/d"
    assert all(legacy.objects.exists(KEYS_DIR, i) for i in result.manifest.expert_ids)
    assert torch.isfinite(logits(tiny_base, versions.router(result.version_id))).all()

    version_usage(versions, result.version_id)  # checked, as the coordinator checks it
    tracker = Tracker(legacy.root)  # the old queued calls first, then the new ones
    queue_untracked(legacy.list_experts(), versions, tracker)
    assert tracker.replay().pending == 0 and tracker.queue.counts()["failed"] == 0
    uri = default_tracking_uri(legacy.root)
    client = MlflowClient(uri, uri)
    tracked = {mv.tags["gaggle.version_id"]
               for mv in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")}
    assert tracked == {V1, V2, result.version_id}

    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for number in (1, 3):  # a stacked version and a version by reference, through MLflow
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/{number}")
        (text,) = model.predict(["Hello"], params={"max_new_tokens": 2})
        assert isinstance(text, str)
