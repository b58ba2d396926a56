"""Poisoned experts: a gate built to win every token is flagged; ordinary experts are not."""

from __future__ import annotations

import json

from coordinator.checks.usage import (
    USAGE_FILE,
    UsageConfig,
    evaluation_prompts,
    measure_router,
    version_usage,
)
from coordinator.checks.usage_charts import HEATMAP, SHARES
from coordinator.store.versions import VersionStore
from coordinator.tracking.replay import usage_tags
from coordinator.versions.assemble import assemble
from routing.stack import stack_experts
from routing.synthetic import random_bundle
from routing.version import KEYS_DIR
from tests.harness.bundles import mean_activations
from tests.harness.stores import add_expert, make_store

CONFIG = UsageConfig(prompts_per_task=3, max_tokens=32)


def test_a_gate_aligned_with_the_mean_activation_is_flagged_and_no_other(tiny_base, tiny_spec):
    prompts = evaluation_prompts(CONFIG)
    assert len(prompts) == 15 and all(isinstance(p, str) and p for p in prompts)
    normal = [random_bundle(tiny_spec, f"normal{i}", seed=i) for i in range(4)]
    poisoned = random_bundle(tiny_spec, "poisoned", seed=99)
    means = mean_activations(tiny_base, prompts, CONFIG.max_tokens)
    poisoned.gates = {module: 1000.0 * means[module] for module in poisoned.gates}

    clean = measure_router(stack_experts(normal), tiny_base, CONFIG, prompts)
    assert clean["flagged"] == [], clean["experts"]
    report = measure_router(stack_experts(normal + [poisoned]), tiny_base, CONFIG, prompts)
    assert report["flagged"] == ["poisoned"], report["experts"]
    assert report["experts"]["poisoned"]["share"] > 0.5
    assert report["experts"]["poisoned"]["uniform"] == 0.2
    assert report["slot"] == "top-1" and report["tokens"] > 100
    shares = [e["share"] for e in report["experts"].values()]
    assert abs(sum(shares) - 1.0) < 1e-3  # every expert adapts every module here
    tags = usage_tags(report)
    assert tags["usage.flagged"] == "poisoned" and "poisoned=" in tags["usage.shares"]
    by_layer = report["by_layer"]  # the heatmap's numbers: layer x expert, largest first
    assert by_layer["layers"] == [0, 1] and by_layer["experts"][0] == "poisoned"
    assert all(row[0] > 0.5 for row in by_layer["shares"])


def test_version_usage_is_measured_once_and_kept_beside_the_version(tiny_spec, tmp_path,
                                                                     ray_local):
    store = make_store(tmp_path / "store", tiny_spec)
    experts = [add_expert(store, tiny_spec, f"e{i}", seed=i) for i in range(2)]
    version_id = assemble(store, store.list_experts()).version_id
    versions = VersionStore(store.layout)
    report = version_usage(versions, version_id, CONFIG)
    assert set(report["experts"]) == {"alice/e0", "alice/e1"}
    folder = versions.folder(version_id)
    assert json.loads((folder / USAGE_FILE).read_text()) == report
    for chart in (HEATMAP, SHARES):  # pictures MLflow shows with the logged model
        assert (folder / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for expert in experts:  # the cached report is read: the router is not opened again
        store.objects.delete(KEYS_DIR, expert.expert_id)
    assert version_usage(versions, version_id, CONFIG) == report
    broken = version_usage(versions, "f" * 16, CONFIG)
    assert "error" in broken and usage_tags(broken) == {"usage.error": broken["error"]}
