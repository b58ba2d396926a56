"""`gaggle-coordinator prune`: remove the versions no longer kept and what only they held."""

from __future__ import annotations

import argparse

from coordinator.commands.options import store_option, tracking_option


def add_parser(sub) -> None:
    prune = sub.add_parser(
        "prune", help="remove old versions and the objects only they refer to",
        description="Keep the newest --keep-last versions, the current one, the champion and "
                    "everything they or the present experts refer to; remove the rest from "
                    "the store and from MLflow (model versions and logged expert files; "
                    "expert runs and their metrics stay). --dry-run says what it would free.")
    store_option(prune)
    tracking_option(prune)
    prune.add_argument("--keep-last", type=int, default=10, metavar="N",
                       help="newest versions to keep besides current and champion (default 10)")
    prune.add_argument("--dry-run", action="store_true",
                       help="print what would be removed and freed, change nothing")
    prune.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.store.experts import Store
    from coordinator.versions.prune import apply_prune, plan_prune

    store = Store(args.store)
    try:
        plan = plan_prune(store, args.keep_last)
        print(("would " if args.dry_run else "") + plan.summary())
        for version_id in plan.versions:
            print(f"  version {version_id}")
        if args.dry_run or not (plan.versions or plan.keys or plan.experts):
            return 0
        freed = apply_prune(store, plan, args.tracking_uri)
    finally:
        store.close()
    print(f"freed {freed / 1e6:.1f} MB in the store")
    return 0
