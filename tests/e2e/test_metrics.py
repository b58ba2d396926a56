"""The coordinator's Prometheus metrics, scraped from a real `serve` during a submission and an
assembly: the counters and histograms move by exactly what happened; `status` prints the
same figures from the store."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from coordinator.cli import main
from protocol.bundle import GATES
from tests.harness.bundles import archive_of, make_bundle, raw_upload, tamper
from tests.harness.servers import add_token, seed_base_spec, start_coordinator, wait_for


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_move_by_what_happened(tmp_path, tiny_spec, capsys):
    root = tmp_path / "store"
    seed_base_spec(root, tiny_spec)
    token = add_token(root, "alice")
    server = start_coordinator(root, extra_args=("--metrics-port", "0",
                                                 "--tracking-uri", "http://127.0.0.1:9"))
    try:
        port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/metrics",
                             server.log()).group(1))
        url = f"http://127.0.0.1:{port}/metrics"
        before = scrape(url)
        assert before[("gaggle_experts", ())] == 0
        assert ("gaggle_submissions_total", (("kind", ""), ("outcome", "accepted"))) \
            not in before
        good = archive_of(make_bundle(tmp_path / "good", tiny_spec, "good", seed=1))
        bad_folder = make_bundle(tmp_path / "bad", tiny_spec, "bad", seed=2)
        tamper(bad_folder, GATES, lambda t: t.update({k: v * float("nan") for k, v in
                                                       t.items()}))
        with server.channel() as channel:
            assert raw_upload(channel, token, good).code == grpc.StatusCode.OK
            refused = raw_upload(channel, token, archive_of(bad_folder))
            assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        after = wait_for(lambda: (lambda m: m if m.get(
            ("gaggle_versions_made_total", (("verdict", "live"),))) == 1 else None)(
                scrape(url)), 120, "a live version in the metrics")
        assert after[("gaggle_submissions_total", (("kind", ""), ("outcome", "accepted")))] == 1
        assert after[("gaggle_submissions_total",
                      (("kind", "INVALID_ARGUMENT"), ("outcome", "refused")))] == 1
        assert after[("gaggle_version_stage_seconds_count", (("stage", "assembly"),))] == 1
        assert after[("gaggle_version_stage_seconds_count", (("stage", "check"),))] == 1
        assert after[("gaggle_accepted_to_live_seconds_count", ())] == 1
        assert after[("gaggle_upload_bytes_total", (("contributor", ""),))] == \
            len(good) + len(archive_of(bad_folder))  # no names without --metrics-contributors
        assert after[("gaggle_experts", ())] == 1 and after[("gaggle_versions_live", ())] == 1
        assert after[("gaggle_experts_waiting", ())] == 0
        time.sleep(1.0)  # the tracking thread has tried MLflow (down) by now
        assert scrape(url)[("gaggle_tracking_calls_queued", ())] >= 2  # expert and version
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    capsys.readouterr()
    assert main(["status", "--store", str(root)]) == 0
    lines = {line[:44].strip(): line[44:].strip()
             for line in capsys.readouterr().out.splitlines()}
    assert lines["experts stored"] == "1" and lines["versions live"] == "1"
    assert lines["current version"] != "-"
