"""A version is live only after its checks, against a real `serve`: among honest experts, a
routing-capture expert (gates along the mean input of the public prompts) and an expert of
+-1e10 everywhere (finite, so intake's finiteness passes it when the update bound is off) are
each rejected with the version that first holds them, quarantined, and never reach CURRENT,
the champion or MLflow's `latest`; the next version without them goes live on its own."""

from __future__ import annotations

from contributor.client import Connection, CoordinatorClient
from coordinator.checks.usage import UsageConfig, evaluation_prompts
from coordinator.cli import main
from coordinator.store.experts import Store
from coordinator.store.versions import VersionStore
from protocol.bundle import save_bundle
from routing.synthetic import random_bundle
from tests.harness.bundles import capture_bundle, huge_bundle
from tests.harness.servers import add_token, seed_base_spec, start_coordinator, wait_for


def _quarantine(store_root, expert_id: str) -> str | None:
    store = Store(store_root)
    try:
        return store.get_expert(expert_id).quarantine
    finally:
        store.close()


def test_poisoned_experts_never_go_live_and_the_next_version_does(tmp_path, tiny_base,
                                                                  tiny_spec):
    root = tmp_path / "store"
    seed_base_spec(root, tiny_spec)
    tokens = {name: add_token(root, name) for name in ("alice", "bob", "mallory")}
    config = tmp_path / "coordinator.toml"  # intake's update bound off: the check must act
    config.write_text("max_update_ratio = 0\n")
    server = start_coordinator(root, extra_args=("--config", str(config)))
    versions = VersionStore(root)

    def submit(contributor: str, bundle) -> str:
        folder = save_bundle(bundle, tmp_path / "out" / bundle.name)
        with CoordinatorClient(Connection(server.address, tokens[contributor])) as client:
            return client.submit(folder).expert_id

    def current_holds(expert_id: str) -> bool:
        current = versions.current_id()
        return bool(current) and expert_id in versions.manifest(current).expert_ids

    try:
        honest = [submit(c, random_bundle(tiny_spec, n, seed=s))
                  for c, n, s in (("alice", "a", 1), ("alice", "b", 2), ("bob", "c", 3))]
        wait_for(lambda: all(current_holds(i) for i in honest), 120, "a version of three")
        live = versions.current_id()
        assert main(["promote", live, "--store", str(root)]) == 0

        prompts = evaluation_prompts(UsageConfig())
        attacks = {"capture": submit("mallory", capture_bundle(tiny_base, "capture", prompts)),
                   "huge": submit("mallory", huge_bundle(tiny_spec, "huge"))}
        reasons = {name: wait_for(lambda i=i: _quarantine(root, i), 180, f"{name} quarantined")
                   for name, i in attacks.items()}
        assert "routing capture" in reasons["capture"], reasons
        assert "non-finite logits" in reasons["huge"], reasons

        late = submit("bob", random_bundle(tiny_spec, "d", seed=4))
        wait_for(lambda: current_holds(late), 120, "the next version live")
        current = versions.manifest(versions.current_id())
        assert not set(attacks.values()) & set(current.expert_ids)
        assert set(honest) <= set(current.expert_ids)
        assert versions.champion_id() == live

        rejected = [m for m in versions.all() if versions.rejection(m.version_id)]
        assert rejected and all(set(attacks.values()) & set(m.expert_ids) for m in rejected)
        assert all(versions.rejection(m.version_id)["culprits"] for m in rejected)
        assert main(["promote", rejected[0].version_id, "--store", str(root)]) == 2

        with CoordinatorClient(Connection(server.address, tokens["mallory"])) as client:
            mine = {e.expert_id: e.quarantine for e in client.list_experts("mallory")}
        assert set(mine) == set(attacks.values()) and all(mine.values())
        assert all(len(reason) <= 300 for reason in mine.values())
        assert main(["experts", "release", attacks["capture"][:12], "--store", str(root)]) == 0
        assert _quarantine(root, attacks["capture"]) is None

        # MLflow's `latest` is the newest live version; the rejected ones are runs only
        from mlflow import MlflowClient

        from coordinator.tracking.tracker import default_tracking_uri

        uri = default_tracking_uri(root)
        registry = MlflowClient(uri, uri)
        latest = wait_for(lambda: _latest(registry, current.version_id), 180, "latest")
        assert latest == current.version_id
        tracked = {mv.tags["gaggle.version_id"]
                   for mv in registry.search_model_versions("name = 'gaggle-router'")}
        assert not tracked & {m.version_id for m in rejected}
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def _latest(registry, expected: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        version = registry.get_model_version_by_alias("gaggle-router", "latest")
    except MlflowException:
        return None
    found = version.tags.get("gaggle.version_id")
    return found if found == expected else None
