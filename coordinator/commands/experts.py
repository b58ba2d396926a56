"""`gaggle-coordinator experts`: one line per stored expert; `experts release ID` lets a
quarantined expert into new versions again, `experts remove ID` deletes an expert."""

from __future__ import annotations

import argparse
import time

from coordinator.commands.options import store_option


def add_parser(sub) -> None:
    experts = sub.add_parser(
        "experts", help="list stored experts, release or remove one",
        description="Without an action: every stored expert, quarantined ones with why. "
                    "release ID: a quarantined expert goes into the next version again. "
                    "remove ID: delete an expert (its bundle and key shard) from the store.")
    experts.add_argument("action", nargs="?", choices=("list", "release", "remove"),
                         default="list")
    experts.add_argument("expert_id", nargs="?", metavar="EXPERT_ID",
                         help="an expert id, or a unique prefix of one")
    store_option(experts)
    experts.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.store.experts import Store
    from protocol.errors import InvalidArgument

    store = Store(args.store)  # that a store exists there, coordinator.cli checked
    try:
        if args.action == "list":
            return _list(store)
        if not args.expert_id:
            raise InvalidArgument(f"experts {args.action} needs an EXPERT_ID: see "
                                  "`gaggle-coordinator experts`", field="expert_id")
        record = store.resolve_expert(args.expert_id)
        if args.action == "release":
            held = store.release(record.expert_id)
            print(f"released {record.key} ({record.expert_id[:16]}): it goes into the next "
                  "version" if held else f"{record.key} was not in quarantine")
        else:
            freed = store.remove_expert(record.expert_id)
            print(f"removed {record.key} ({record.expert_id[:16]}), {freed} bytes; versions "
                  "that hold it keep it until they are pruned")
        return 0
    finally:
        store.close()


def _list(store) -> int:
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
        if e.quarantine:
            print(f"  quarantined: {e.quarantine}")
    held = sum(1 for e in experts if e.quarantine)
    print(f"{len(experts)} experts" + (f", {held} in quarantine: `gaggle-coordinator experts "
                                       "release EXPERT_ID` lets one back in" if held else ""))
    return 0
