"""`gaggle-contributor status --coordinator HOST:PORT`: the federation and your experts."""

from __future__ import annotations

import argparse
import time

from contributor.commands.flags import add_connection_flags, connection_from_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("status", help="show the federation's base model and your experts")
    add_connection_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the federation's base model, methods and limit, and the caller's experts."""
    from contributor.client import CoordinatorClient  # grpc: see contributor.cli

    with CoordinatorClient(connection_from_args(args)) as client:
        federation = client.federation()
        experts = client.list_experts(federation.contributor)
    print(f"coordinator {args.coordinator} (gaggle {federation.server_version})")
    print(f"base model: {federation.base_model} (fingerprint {federation.base_fingerprint})")
    print(f"methods: {', '.join(federation.methods)}; largest bundle "
          f"{federation.max_bundle_bytes} bytes")
    print(f"you are {federation.contributor}: {len(experts)} expert(s)")
    for expert in experts:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(expert.created_at))
        print(f"  {expert.expert_id}  {expert.name:<24} {expert.method:<5} {when}")
        if expert.quarantine:  # one bounded line from the coordinator's checks
            print(f"    quarantined, left out of new versions: {expert.quarantine}")
    return 0
