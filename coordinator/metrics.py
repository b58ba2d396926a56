"""The coordinator's metrics, for Prometheus (`serve --metrics-port PORT`): the one place that
names them.

Counters and histograms are updated where things happen (intake, the servicer, the
assembler, the tracking replay); the gauges of the store (experts, quarantine, versions, the
MLflow queue, uploads in flight) are read from it at each scrape. Labels are closed sets:
the error kind of a refusal is its status name, never free text, and a contributor name is a
label only where the operator turns it on (`--metrics-contributors`), for cardinality.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()  # this process's; not prometheus_client's global one
_STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

UPLOAD_BYTES = Counter("gaggle_upload_bytes", "Archive bytes received by upload streams",
                       ["contributor"], registry=REGISTRY)
SUBMISSIONS = Counter("gaggle_submissions", "Upload calls answered: accepted (an expert "
                      "stored) or refused, by the refusal's status", ["outcome", "kind"],
                      registry=REGISTRY)
STAGE_SECONDS = Histogram("gaggle_version_stage_seconds", "Seconds of each stage a version "
                          "goes through: assembly, check, evaluation", ["stage"],
                          buckets=_STAGE_BUCKETS, registry=REGISTRY)
TO_LIVE_SECONDS = Histogram("gaggle_accepted_to_live_seconds", "Seconds from an expert's "
                            "acceptance to the first live version that holds it",
                            buckets=_STAGE_BUCKETS, registry=REGISTRY)
VERSIONS_MADE = Counter("gaggle_versions_made", "Versions checked, by verdict (live or "
                        "rejected)", ["verdict"], registry=REGISTRY)
TRACKING_SECONDS = Histogram("gaggle_tracking_call_seconds", "Seconds of each tracking call "
                             "replayed into MLflow, by kind", ["kind"], buckets=_STAGE_BUCKETS,
                             registry=REGISTRY)
CALLS_IN_FLIGHT = Gauge("gaggle_calls_in_flight", "Authenticated calls being handled (each "
                        "holds a server thread)", registry=REGISTRY)

_settings = {"contributors": False}
_lock = threading.Lock()


def contributor_label(name: str) -> str:
    """The contributor label of a metric: the name where the operator allowed it, else ''."""
    return name if _settings["contributors"] else ""


def refused(kind: str) -> None:
    SUBMISSIONS.labels("refused", kind).inc()


def accepted() -> None:
    SUBMISSIONS.labels("accepted", "").inc()


# The federation's figures (coordinator.versions.status), read from the store at each scrape
STORE_GAUGES = {
    "experts": "Experts stored",
    "quarantined_experts": "Experts left out of new versions by a failed check",
    "experts_waiting": "Experts stored but in no live version yet",
    "oldest_waiting_seconds": "Seconds the oldest waiting expert has waited",
    "versions_live": "Versions that passed their checks",
    "versions_rejected": "Versions that failed their checks",
    "tracking_calls_queued": "MLflow calls waiting to be replayed",
    "tracking_calls_failed": "MLflow calls MLflow refused for good",
    "uploads_in_flight": "Upload streams being received",
}


class StoreGauges:
    """Gauges read at each scrape: `read()` gives the figures named in STORE_GAUGES."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read

    def collect(self):
        for key, value in self.read().items():
            yield GaugeMetricFamily(f"gaggle_{key}", STORE_GAUGES[key], value=value)


def serve_metrics(port: int, host: str, read: Callable[[], dict[str, float]],
                  contributors: bool = False) -> int:
    """Expose the metrics on http://HOST:PORT/metrics (port 0: a free one); the port."""
    with _lock:
        _settings["contributors"] = contributors
        REGISTRY.register(StoreGauges(read))
        server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server.server_port
