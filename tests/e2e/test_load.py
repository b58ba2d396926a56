"""Load, scaled down: concurrent contributors submitting 2 MiB bundles all land, no errors."""

from __future__ import annotations

from tests.harness.bundles import store_snapshot
from tests.harness.loadgen import make_bundles, run_load
from tests.harness.servers import seed_base_spec, start_coordinator

CONTRIBUTORS = 8
PER_CONTRIBUTOR = 2


def test_concurrent_contributors_with_2mb_bundles_all_land(tmp_path, tiny_spec):
    bundles = make_bundles(tiny_spec, tmp_path / "bundles", CONTRIBUTORS, PER_CONTRIBUTOR)
    assert all((b / "adapter.safetensors").stat().st_size >= 2 * 2**20
               for row in bundles for b in row)
    seed_base_spec(tmp_path / "store", tiny_spec)
    server = start_coordinator(tmp_path / "store", extra_args=("--no-assembly",))
    try:
        result = run_load(server, bundles)
    finally:
        server.stop()
    print(result.summary())
    assert result.errors == []
    assert len(result.latencies) == CONTRIBUTORS * PER_CONTRIBUTOR
    assert len(set(result.expert_ids)) == CONTRIBUTORS * PER_CONTRIBUTOR
    rows, files = store_snapshot(tmp_path / "store")
    assert sorted(r[0] for r in rows) == sorted(result.expert_ids)
    assert {f.split("/")[1] for f in files} == set(result.expert_ids)
    assert result.percentile(0.99) >= result.percentile(0.5) > 0
