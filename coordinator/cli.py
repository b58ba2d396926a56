"""`gaggle-coordinator`: serve, manage tokens, list experts, assemble and manage versions.

Each subcommand is a module of coordinator.commands (`add_parser`, `run`); this module lists
them and runs the chosen one with the errors every command shares.
"""

from __future__ import annotations

import argparse
import sys

from coordinator.commands import (
    assemble,
    diff,
    evaluate,
    experts,
    export,
    promote,
    prune,
    serve,
    status,
    token,
    versions,
)
from protocol.errors import GaggleError

# The commands import torch, grpc, Ray and MLflow inside `run`: measured on a 2-core machine,
# `gaggle-coordinator --help` takes 0.14 s that way and 5.1-5.4 s with them at the top.
COMMANDS = (serve, token, experts, status, assemble, versions, diff, promote, evaluate, export,
            prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaggle-coordinator",
        description="Collect expert bundles over gRPC, validate and store them, assemble "
                    "PHATGOOSE router versions with Ray and track them in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "store_must_exist", False):
            # Before the command runs: opening a store creates one, so a mistyped --store
            # would otherwise leave an empty store behind and report that it holds nothing.
            from coordinator.store.layout import Layout  # torch, through protocol.bundle

            Layout.of(args.store).require()
        return int(args.run(args) or 0)
    except GaggleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
