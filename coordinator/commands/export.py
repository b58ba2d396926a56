"""`gaggle-coordinator export V --out DIR`: a router folder `routing.version.load_router` reads
alone."""

from __future__ import annotations

import argparse

from coordinator.commands.options import store_option


def add_parser(sub) -> None:
    export = sub.add_parser("export", help="write a self-contained router version")
    export.add_argument("version", help="version id")
    export.add_argument("--out", required=True, help="output folder (must not exist)")
    store_option(export)
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.store.versions import VersionStore

    version_id, weights = VersionStore(args.store).export(args.version, args.out)
    print(f"exported version {version_id} ({len(weights.experts)} experts, "
          f"{len(weights.modules)} modules) to {args.out}")
    return 0
