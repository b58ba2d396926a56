"""Tracking against a real `mlflow server` on loopback: one run per expert, one registered model
version per router version (a loadable pyfunc), and exactly-once replay after an outage."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from coordinator.cli import main
from coordinator.store.versions import VersionStore
from coordinator.tracking.names import EXPERIMENT, REGISTERED_MODEL, TAG_VERSION
from coordinator.tracking.tracker import MAX_RUN_AGE_S, Tracker, run_window
from coordinator.versions.assembler import Assembler
from protocol.manifest import MANIFEST, read_manifest
from routing.router import route, unroute
from tests.harness import postgres
from tests.harness.servers import MlflowServer
from tests.harness.stores import add_expert, make_store

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path_factory):
    """An MLflow server on the embedded-style SQLite backend, then on a PostgreSQL server (a
    shared tracking server's backend: see docker-compose.yml)."""
    from coordinator.ray_cluster import ensure_ray

    database = None
    if request.param == "postgresql":
        if postgres.unavailable():
            pytest.skip(postgres.unavailable())
        database = postgres.PostgresServer().start()
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"),
                          database.uri if database else None)
    server.launch()
    ensure_ray()  # while the server boots
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        if database:
            database.stop()


@pytest.fixture
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)


def _start(store, uri: str) -> tuple[Assembler, Tracker]:
    tracker = Tracker(store.root, uri)
    tracker.start(retry_s=0.5)
    return Assembler(store, tracker=tracker).start(), tracker


def _runs_of(client, expert_id: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.expert_id = '{expert_id}'")


def _model_versions_of(client, version_id: str) -> list:
    return client.search_model_versions(
        f"name = '{REGISTERED_MODEL}' and tags.`{TAG_VERSION}` = '{version_id}'")


def test_every_expert_and_version_is_tracked_and_loadable(tmp_path, tiny_spec, mlflow_server,
                                                          client):
    import mlflow

    store = make_store(tmp_path / "store", tiny_spec)
    assembler, tracker = _start(store, mlflow_server.uri)
    records = []
    try:
        for name, seed, method in (("a", 1, "lora"), ("b", 2, "ia3"), ("c", 3, "lora")):
            records.append(add_expert(store, tiny_spec, name, seed, method=method))
            assembler.on_accepted(records[-1])
            assert assembler.wait_idle(120), assembler.last_error
        assert tracker.wait_idle(120), tracker.queue.counts()
    finally:
        assembler.close()
    manifests = VersionStore(store.root).all()
    assert [sorted(m.names) for m in manifests] == [
        ["alice/a"], ["alice/a", "alice/b"], ["alice/a", "alice/b", "alice/c"]]

    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(client.search_runs([experiment.experiment_id])) == 3
    for record in records:
        (run,) = _runs_of(client, record.expert_id)
        assert run.info.run_name == f"alice/{record.name}"
        training = read_manifest(store.bundle_folder(record.expert_id) / MANIFEST).training
        assert run.info.start_time == int(training["started_at"] * 1000)  # the training's span
        assert run.info.end_time == int(training["finished_at"] * 1000)
        assert run.data.tags["contributor"] == record.contributor
        assert run.data.params["contributor"] == "alice"
        assert run.data.params["method"] == record.method
        assert run.data.params["expert_steps"] == "6"
        assert ("rank" in run.data.params) == (record.method == "lora")
        losses = client.get_metric_history(run.info.run_id, "expert_loss_curve")
        assert len(losses) == 3
    for record in records:  # each expert's bundle and key shard, logged once with its run
        (run,) = _runs_of(client, record.expert_id)
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert logged == {"bundle", "keys"}
    for manifest in manifests:
        (model_version,) = _model_versions_of(client, manifest.version_id)
        tags = model_version.tags
        assert tags["n_experts"] == str(len(manifest.experts))
        assert tags["expert_ids"] == ",".join(manifest.expert_ids)
        assert tags["contributors"] == "alice"
        assert tags["parent_version"] == (manifest.parent or "")
        assert tags["diff"] == manifest.diff
        card = model_version.description  # the model card MLflow shows on the version page
        assert f"# Router version `{manifest.version_id}`" in card
        assert all(f"| {e.name} | alice | {e.method} |" in card for e in manifest.experts)
        assert ("## Usage" in card) and (manifest.diff in card)
        folder = tmp_path / manifest.version_id
        mlflow.artifacts.download_artifacts(model_version.source, dst_path=str(folder),
                                            tracking_uri=mlflow_server.uri)
        assert (folder / "MLmodel").is_file()
        # by reference: the logged model holds no expert tensor, only the manifest and the
        # runs to fetch the experts from
        assert not list(folder.rglob("*.safetensors")), list(folder.rglob("*"))
        assert (folder / "artifacts" / "sources.json").is_file()

    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_registry_uri(mlflow_server.uri)
    latest = client.get_model_version_by_alias(REGISTERED_MODEL, "latest")
    assert latest.tags[TAG_VERSION] == manifests[-1].version_id
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@latest")
    texts = model.predict(["The film was", "Hello"], params={"max_new_tokens": 4})
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    # the router resolved through MLflow alone routes as the store's own copy of the version
    from_mlflow = model.unwrap_python_model()
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        got = from_mlflow.base.model(tokens).logits
        route(from_mlflow.base, VersionStore(store.root).router(manifests[-1].version_id))
        expected = from_mlflow.base.model(tokens).logits
    unroute(from_mlflow.base.model)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    first, last = manifests[0].version_id, manifests[-1].version_id
    for version in (first, last):
        assert main(["promote", version, "--store", str(store.root),
                     "--tracking-uri", mlflow_server.uri]) == 0
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert champion.tags[TAG_VERSION] == last
    # MLflow keeps only where the alias points; the registered model's card keeps the history.
    history = client.get_registered_model(REGISTERED_MODEL).description
    assert "## Champion history" in history
    assert "| 1 |" in history and f"| - | {first} |" in history
    assert "| 2 |" in history and f"| {first} | {last} |" in history


def test_calls_queued_while_mlflow_is_down_land_exactly_once(tmp_path, tiny_spec,
                                                             mlflow_server, client):
    store = make_store(tmp_path / "store", tiny_spec)
    assembler, tracker = _start(store, mlflow_server.uri)
    try:
        assembler.on_accepted(add_expert(store, tiny_spec, "x", seed=11))
        assert assembler.wait_idle(120) and tracker.wait_idle(120)
        mlflow_server.stop()
        late = [add_expert(store, tiny_spec, name, seed) for name, seed in (("y", 12),
                                                                           ("z", 13))]
        for record in late:
            assembler.on_accepted(record)
        assert assembler.wait_idle(120), assembler.last_error
        newest = VersionStore(store.root).current_id()
        names = VersionStore(store.root).manifest(newest).names
        assert names == ["alice/x", "alice/y", "alice/z"]  # assembled while MLflow was down
        assert tracker.queue.counts()["pending"] >= 3
        assert not tracker.wait_idle(1.0)
        mlflow_server.start()
        assert tracker.wait_idle(120), tracker.queue.counts()
    finally:
        assembler.close()
    assert tracker.queue.counts()["failed"] == 0
    for record in late:
        assert len(_runs_of(client, record.expert_id)) == 1
    assert len(_model_versions_of(client, newest)) == 1

    # A replay that runs again (say, a crash before the queue marked calls done) must not
    # duplicate anything: every call checks MLflow for its own id first.
    with sqlite3.connect(tracker.queue.path) as db:
        db.execute("UPDATE ops SET state = 'pending'")
    assert tracker.replay().pending == 0
    for record in late:
        assert len(_runs_of(client, record.expert_id)) == 1
    for manifest in VersionStore(store.root).all():
        assert len(_model_versions_of(client, manifest.version_id)) == 1


def test_an_expert_run_spans_its_training_moved_back_when_the_contributor_clock_runs_ahead():
    accepted = 1_800_000_000.0
    assert run_window({"started_at": accepted - 90, "finished_at": accepted - 30}, accepted) \
        == (int((accepted - 90) * 1000), int((accepted - 30) * 1000))
    # A clock 1 h ahead: the 60 s of training end at acceptance, not an hour in the future.
    assert run_window({"started_at": accepted + 3540, "finished_at": accepted + 3600},
                      accepted) == (int((accepted - 60) * 1000), int(accepted * 1000))
    # A start years back, or figures missing: clipped to the window, or acceptance itself.
    assert run_window({"started_at": 0.0, "finished_at": accepted}, accepted)[0] == \
        int((accepted - MAX_RUN_AGE_S) * 1000)
    assert run_window({}, accepted) == (int(accepted * 1000), int(accepted * 1000))
