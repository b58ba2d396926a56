"""End to end through real processes: a coordinator (gRPC, local Ray) and an `mlflow server` on
loopback; experts submitted one after another with the contributor client become router
versions, runs and registered model versions, each evaluated on public tasks."""

from __future__ import annotations

import json

from contributor.client import Connection, CoordinatorClient
from coordinator.checks.evaluation import read_evaluation
from coordinator.cli import main
from coordinator.store.versions import VersionStore
from coordinator.tracking.names import EXPERIMENT, REGISTERED_MODEL, TAG_EVAL_CONFIG, TAG_VERSION
from protocol.bundle import save_bundle
from routing.synthetic import random_bundle
from tests.harness.servers import (
    MlflowServer,
    add_token,
    seed_base_spec,
    start_coordinator,
    wait_for,
)


def _eval_tags(registry, version_id: str) -> dict[str, str]:
    (model_version,) = registry.search_model_versions(
        f"name = '{REGISTERED_MODEL}' and tags.`{TAG_VERSION}` = '{version_id}'")
    return {k: v for k, v in model_version.tags.items()
            if k.startswith("eval.") or k == TAG_EVAL_CONFIG}


def test_submitted_experts_become_tracked_versions(tmp_path, tiny_spec, capsys):
    import mlflow
    from mlflow import MlflowClient

    tracking = MlflowServer(tmp_path / "mlflow")
    tracking.launch()
    store = tmp_path / "store"
    seed_base_spec(store, tiny_spec)
    eval_config = tmp_path / "eval.toml"
    eval_config.write_text('tasks = ["openbookqa", "imdb-sentiment"]\nexamples_per_task = 6\n')
    server = start_coordinator(store, extra_args=("--tracking-uri", tracking.uri,
                                                  "--eval-config", str(eval_config)))
    try:
        tracking.wait_ready()
        token = add_token(store, "alice")
        with CoordinatorClient(Connection(server.address, token)) as client:
            for count, (name, method) in enumerate((("a", "lora"), ("b", "ia3"),
                                                    ("c", "lora")), start=1):
                bundle = random_bundle(tiny_spec, name, method=method, seed=count)
                bundle.manifest.training = {"expert_steps": 5, "expert_loss_curve": [2.0, 1.0]}
                save_bundle(bundle, tmp_path / name)
                client.submit(tmp_path / name)
                wait_for(lambda n=count: len(VersionStore(store).all()) == n, 180,
                         f"version {count}:\n{server.log()}")
        sets = [sorted(m.names) for m in VersionStore(store).all()]
        assert sets == [["alice/a"], ["alice/a", "alice/b"], ["alice/a", "alice/b", "alice/c"]]
        assert {e.contributor for e in VersionStore(store).all()[-1].experts} == {"alice"}

        registry = MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
        wait_for(lambda: len(registry.search_model_versions(
            f"name = '{REGISTERED_MODEL}'")) == 3, 180, "three model versions")
        experiment = registry.get_experiment_by_name(EXPERIMENT)
        runs = registry.search_runs([experiment.experiment_id])
        expert_runs = [r for r in runs if "expert_id" in r.data.tags]  # not evaluation runs
        assert sorted(r.data.params["name"] for r in expert_runs) == ["a", "b", "c"]
        latest = registry.get_model_version_by_alias(REGISTERED_MODEL, "latest")
        assert latest.tags[TAG_VERSION] == VersionStore(store).current_id()
        mlflow.set_tracking_uri(tracking.uri)
        mlflow.set_registry_uri(tracking.uri)
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@latest")
        (text,) = model.predict(["Hello"], params={"max_new_tokens": 3})
        assert isinstance(text, str)

        # Every version is evaluated by the coordinator: eval.* tags in MLflow, local records.
        for manifest in VersionStore(store).all():
            version_id = manifest.version_id
            tags = wait_for(lambda v=version_id: "eval.accuracy" in _eval_tags(registry, v)
                            and _eval_tags(registry, v), 180, f"eval tags:\n{server.log()}")
            metrics = read_evaluation(store, version_id)["metrics"]
            assert set(tags) == {"eval.accuracy", "eval.openbookqa", "eval.imdb-sentiment",
                                 TAG_EVAL_CONFIG}
            assert {k: float(tags[f"eval.{k}"]) for k in metrics} == metrics
            (run,) = registry.search_runs([experiment.experiment_id], filter_string=(
                f"tags.`{TAG_VERSION}` = '{version_id}'"))
            assert run.data.metrics == metrics and run.data.params["examples_per_task"] == "6"
        capsys.readouterr()
        assert main(["versions", "--store", str(store), "--tracking-uri", tracking.uri,
                     "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert all(set(r["metrics"]) == {"accuracy", "openbookqa", "imdb-sentiment"}
                   for r in rows) and len(rows) == 3
        assert main(["versions", "--store", str(store), "--tracking-uri", tracking.uri]) == 0
        assert "accuracy=" in capsys.readouterr().out
    finally:
        assert server.stop(timeout=60) == 0, server.log()
        tracking.stop()
