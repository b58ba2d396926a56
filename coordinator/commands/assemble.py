"""`gaggle-coordinator assemble`: a router version from every stored expert, tracked in MLflow."""

from __future__ import annotations

import argparse

from coordinator.commands.options import ray_options, replay_line, store_option, tracking_option


def add_parser(sub) -> None:
    assemble = sub.add_parser("assemble", help="assemble a router version from all experts")
    store_option(assemble)
    tracking_option(assemble)
    ray_options(assemble)
    assemble.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.checks.usage import version_usage
    from coordinator.ray_cluster import parse_resources
    from coordinator.store.experts import Store
    from coordinator.store.versions import VersionStore
    from coordinator.tracking.tracker import Tracker
    from coordinator.versions.assemble import AssemblyConfig, assemble_store
    from coordinator.versions.record import queue_untracked

    config = AssemblyConfig(ray_address=args.ray_address,
                            resources=parse_resources(args.ray_resources))
    store = Store(args.store)
    try:
        versions = VersionStore(store.layout, store.objects)
        result = assemble_store(store, config, make_current=False)
        manifest = result.manifest
        state = "new" if result.created else "unchanged, already"
        print(f"version {result.version_id} ({state}): {len(manifest.experts)} experts, "
              f"{manifest.diff}; {result.seconds:.1f} s")
        usage = version_usage(versions, result.version_id)  # live only once checked
        print(f"usage check: {'failed: ' + usage['error'] if 'error' in usage else 'done'}"
              + (f"; flagged {', '.join(usage['flagged'])}" if usage.get("flagged") else ""))
        versions.set_current(result.version_id)
        tracker = Tracker(args.store, args.tracking_uri)
        queue_untracked(store.list_experts(), versions, tracker)
    finally:
        store.close()
    print(replay_line(tracker))
    return 0
