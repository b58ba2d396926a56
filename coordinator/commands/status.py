"""`gaggle-coordinator status`: where the federation stands, on one screen (the figures the
metrics endpoint exports, for an operator without Prometheus)."""

from __future__ import annotations

import argparse

from coordinator.commands.options import store_option

LABELS = {
    "experts": "experts stored",
    "quarantined_experts": "  in quarantine (left out of new versions)",
    "experts_waiting": "  waiting for a live version",
    "oldest_waiting_seconds": "  oldest wait (s)",
    "versions_live": "versions live",
    "versions_rejected": "versions rejected",
    "tracking_calls_queued": "MLflow calls queued",
    "tracking_calls_failed": "MLflow calls refused for good",
}


def add_parser(sub) -> None:
    status = sub.add_parser("status", help="where the federation stands, in figures")
    store_option(status)
    status.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.store.experts import Store
    from coordinator.store.versions import VersionStore
    from coordinator.versions.status import federation_status

    store = Store(args.store)
    try:
        figures = federation_status(store)
        versions = VersionStore(store.layout, store.objects)
        pointers = {"current": versions.current_id(), "champion": versions.champion_id()}
    finally:
        store.close()
    for key, label in LABELS.items():
        value = figures[key]
        print(f"{label:<44} {value:.0f}" if key.endswith("seconds") else
              f"{label:<44} {int(value)}")
    for name, version_id in pointers.items():
        print(f"{name + ' version':<44} {version_id or '-'}")
    return 0
