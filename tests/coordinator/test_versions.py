"""The version commands: diff (experts added, removed, changed, and per module by how much),
export (a router folder routing loads alone) and the version listing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from coordinator.checks.usage import version_usage
from coordinator.cli import main
from coordinator.store.versions import VersionStore
from coordinator.versions.assemble import assemble
from coordinator.versions.diff import diff_versions
from protocol.bundle import load_bundle
from routing.router import route
from routing.version import load_router
from tests.harness.stores import add_expert, commit, make_store

pytestmark = pytest.mark.usefixtures("ray_local")
CHANGED = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def two_versions(tmp_path, tiny_spec):
    """v1 = {a, b}; v2 = {a with one module's B changed, b, c}."""
    store = make_store(tmp_path / "store", tiny_spec)
    a = add_expert(store, tiny_spec, "a", seed=1)
    add_expert(store, tiny_spec, "b", seed=2)
    v1 = assemble(store, store.list_experts())
    retrained = copy.deepcopy(load_bundle(store.bundle_folder(a.expert_id)))
    key = f"{CHANGED}.lora_B"
    torch.manual_seed(5)
    retrained.adapter[key] = retrained.adapter[key] + 0.01 * torch.randn_like(
        retrained.adapter[key])
    a2 = commit(store, retrained)
    add_expert(store, tiny_spec, "c", seed=3)
    v2 = assemble(store, store.list_experts())
    for version in (v1, v2):  # checked, as the serving coordinator checks them
        version_usage(VersionStore(store.layout), version.version_id)
    return (store, v1.version_id, v2.version_id, load_bundle(store.bundle_folder(a.expert_id)),
            load_bundle(store.bundle_folder(a2.expert_id)))


def test_diff_shows_one_added_and_one_replaced_expert(two_versions):
    store, v1, v2, old, new = two_versions
    diff = diff_versions(store.root, v1, v2)
    assert diff.added == ["alice/c"] and diff.removed == [] and list(diff.changed) == ["alice/a"]
    modules = {m.module: m for m in diff.changed["alice/a"]}
    moved = [name for name, m in modules.items() if m.status != "unchanged"]
    assert moved == [CHANGED]
    scaling = old.manifest.peft["scaling"]
    before = scaling * old.adapter[f"{CHANGED}.lora_B"] @ old.adapter[f"{CHANGED}.lora_A"]
    after = scaling * new.adapter[f"{CHANGED}.lora_B"] @ new.adapter[f"{CHANGED}.lora_A"]
    expected = float(torch.linalg.norm(after - before) / torch.linalg.norm(before))
    assert modules[CHANGED].delta == pytest.approx(expected, rel=1e-5)
    assert modules[CHANGED].gate == 0.0


def test_diff_command_prints_exactly_the_changes(two_versions, capsys):
    store, v1, v2, _, _ = two_versions
    assert main(["diff", v1[:8], v2, "--store", str(store.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = [line.split()[0:2] for line in lines if line[:2] in ("+ ", "- ", "~ ")]
    assert marked == [["+", "alice/c"], ["~", "alice/a"]]
    assert any(CHANGED in line and "changed" in line for line in lines)
    assert main(["diff", v2, v1, "--store", str(store.root), "--json"]) == 0
    reverse = json.loads(capsys.readouterr().out)
    assert reverse["removed"] == ["alice/c"] and list(reverse["changed"]) == ["alice/a"]


def test_export_is_a_router_folder_that_routes_alone(two_versions, tiny_base, tmp_path, capsys):
    store, _, v2, _, _ = two_versions
    out = tmp_path / "exported"
    assert main(["export", v2, "--store", str(store.root), "--out", str(out)]) == 0
    weights = load_router(out)
    assert sorted(weights.experts) == ["alice/a", "alice/b", "alice/c"]
    assert json.loads((out / "version.json").read_text())["version_id"] == v2
    inputs = torch.tensor([[5, 6, 7, 8]])
    model = route(tiny_base, weights)
    try:
        with torch.no_grad():
            routed = model(inputs).logits
    finally:
        from routing.router import unroute

        unroute(model)
    with torch.no_grad():
        plain = tiny_base.model(inputs).logits
    assert not torch.allclose(routed, plain)  # the experts take part
    assert main(["export", v2, "--store", str(store.root), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_versions_command_lists_versions_with_local_aliases(two_versions, capsys):
    store, v1, v2, _, _ = two_versions
    assert main(["versions", "--store", str(store.root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version_id"] for r in rows] == [v1, v2]
    assert [r["n_experts"] for r in rows] == [2, 3]
    assert rows[1]["aliases"] == ["current", "latest"] and rows[1]["parent"] == v1
    assert [r["state"] for r in rows] == ["live", "live"]
    assert main(["versions", "--store", str(store.root)]) == 0
    table = capsys.readouterr().out
    assert v1 in table and "+alice/c ~alice/a" in table


def test_unknown_version_is_a_clear_error(two_versions, capsys):
    store, _, _, _, _ = two_versions
    assert main(["diff", "ffff", "eeee", "--store", str(store.root)]) == 2
    assert "no router version 'ffff'" in capsys.readouterr().err


def test_assemble_command_tracks_into_the_embedded_store(tmp_path, tiny_spec, capsys):
    """Without --tracking-uri, MLflow is a SQLite file inside the store folder."""
    from mlflow import MlflowClient

    from coordinator.tracking.names import REGISTERED_MODEL
    from coordinator.tracking.tracker import default_tracking_uri

    store = make_store(tmp_path / "store", tiny_spec)
    add_expert(store, tiny_spec, "a", seed=1)
    assert main(["assemble", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "(new): 1 experts, +a" in out and "up to date" in out
    assert (store.root / "mlflow" / "mlflow.db").is_file()
    uri = default_tracking_uri(store.root)
    (model_version,) = MlflowClient(uri, uri).search_model_versions(
        f"name = '{REGISTERED_MODEL}'")
    assert model_version.tags["n_experts"] == "1"
    assert main(["assemble", "--store", str(store.root)]) == 0  # nothing new: same version
    assert "unchanged" in capsys.readouterr().out
    assert main(["versions", "--store", str(store.root), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["mlflow_version"] == 1


def test_operator_commands_track_where_serve_does_never_into_a_second_history(two_versions,
                                                                             capsys):
    """The coordinator tracks into a remote MLflow (here one that is down): `promote` and
    `versions` without --tracking-uri use that one, and create no embedded store."""
    from coordinator.tracking.tracker import record_tracking_uri

    store, _, v2, _, _ = two_versions
    remote = "http://127.0.0.1:9"
    record_tracking_uri(store.layout, remote)  # as `serve --tracking-uri` records it
    assert main(["promote", v2, "--store", str(store.root)]) == 0
    assert remote in capsys.readouterr().out  # queued for that MLflow, to replay later
    assert main(["versions", "--store", str(store.root)]) == 0
    assert remote in capsys.readouterr().err  # unreachable: said, not replaced
    assert not (store.root / "mlflow" / "mlflow.db").exists()
