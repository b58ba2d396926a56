"""`gaggle-coordinator experts`: one line per stored expert."""

from __future__ import annotations

import argparse
import time

from coordinator.commands.options import store_option


def add_parser(sub) -> None:
    experts = sub.add_parser("experts", help="list stored experts")
    store_option(experts)
    experts.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.store.experts import Store

    store = Store(args.store)  # that a store exists there, coordinator.cli checked
    experts = store.list_experts()
    if not experts:
        print(f"no experts in {store.root}")
        return 0
    print(f"{'expert id':<16} {'name':<24} {'contributor':<16} {'method':<6} "
          f"{'size':>10}  accepted (UTC)")
    for e in experts:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.created_at))
        print(f"{e.expert_id[:16]:<16} {e.name[:24]:<24} {e.contributor[:16]:<16} "
              f"{e.method:<6} {e.size_bytes:>10}  {when}")
    print(f"{len(experts)} experts")
    return 0
