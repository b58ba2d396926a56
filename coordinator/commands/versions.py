"""`gaggle-coordinator versions`: the router versions, oldest first."""

from __future__ import annotations

import argparse
import json
import sys

from coordinator.commands.options import store_option, tracking_option


def add_parser(sub) -> None:
    versions = sub.add_parser("versions", help="list router versions")
    store_option(versions)
    tracking_option(versions)
    versions.add_argument("--json", action="store_true", help="print the list as JSON")
    versions.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """id, time, experts, aliases, eval metrics (oldest first)."""
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.versions.history import version_rows

    rows, note = version_rows(args.store, args.tracking_uri)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no router versions yet: submit experts or run `gaggle-coordinator assemble`")
        return 0
    print(f"{'version':<17} {'created (UTC)':<21} {'state':<9} {'mlflow':>6} {'experts':>7}  "
          f"{'aliases':<24} metrics / diff")
    for row in rows:
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(row["metrics"].items()))
        number = row["mlflow_version"] if row["mlflow_version"] is not None else "-"
        print(f"{row['version_id']:<17} {row['created_at']:<21} {row['state']:<9} "
              f"{number:>6} {row['n_experts']:>7}  {','.join(row['aliases']):<24} "
              f"{metrics or row['diff']}")
        if row["reason"]:
            print(f"  rejected: {row['reason']}")
    return 0
