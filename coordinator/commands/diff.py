"""`gaggle-coordinator diff OLD NEW`: experts added, removed, changed, and how much per module."""

from __future__ import annotations

import argparse
import json

from coordinator.commands.options import store_option


def add_parser(sub) -> None:
    diff = sub.add_parser("diff", help="experts added, removed and changed between versions")
    diff.add_argument("old", help="older version id")
    diff.add_argument("new", help="newer version id")
    store_option(diff)
    diff.add_argument("--json", action="store_true", help="print the diff as JSON")
    diff.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.versions.diff import diff_versions

    diff = diff_versions(args.store, args.old, args.new)
    if args.json:
        print(json.dumps(diff.to_json(), indent=1))
        return 0
    print(f"diff {diff.old} -> {diff.new}")
    for name in diff.added:
        print(f"+ {name}  (expert {diff.expert_ids[name][1][:12]})")
    for name in diff.removed:
        print(f"- {name}  (expert {diff.expert_ids[name][0][:12]})")
    for name, modules in diff.changed.items():
        old_id, new_id = diff.expert_ids[name]
        moved = [m for m in modules if m.status != "unchanged"]
        print(f"~ {name}  (expert {old_id[:12]} -> {new_id[:12]}): {len(moved)} of "
              f"{len(modules)} modules changed")
        for m in moved:
            delta = "n/a" if m.delta is None else f"{m.delta:.4f}"
            gate = "n/a" if m.gate is None else f"{m.gate:.4f}"
            print(f"    {m.status:<8} {m.module:<48} delta {delta:>8}  gate {gate:>8}  "
                  f"{m.kinds}")
    if not (diff.added or diff.removed or diff.changed):
        print("no expert changes")
    return 0
