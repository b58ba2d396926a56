"""`gaggle-contributor cancel DIR --coordinator HOST:PORT`: abandon an interrupted upload."""

from __future__ import annotations

import argparse

from contributor.commands.flags import add_connection_flags, connection_from_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "cancel", help="abandon an interrupted upload of a bundle (instead of resuming it)",
        description="An interrupted `submit` resumes where it stopped when run again; "
                    "`cancel` instead deletes what the coordinator holds of the upload and "
                    "frees its slot at once (idle uploads otherwise expire after an hour).")
    parser.add_argument("bundle", help="bundle folder")
    add_connection_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Cancel the bundle's live upload, or say that the bundle is already stored."""
    from contributor.client import CoordinatorClient  # grpc: see contributor.cli

    with CoordinatorClient(connection_from_args(args)) as client:
        cancelled = client.cancel(args.bundle)
    print(f"cancelled upload {cancelled}" if cancelled else
          f"{args.bundle} is already stored: nothing to cancel")
    return 0
