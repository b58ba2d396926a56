"""`gaggle-contributor submit DIR --coordinator HOST:PORT`: upload a bundle, print its expert id."""

from __future__ import annotations

import argparse
import sys

from contributor.commands.flags import add_connection_flags, connection_from_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "submit", help="upload a bundle to a coordinator (resumable)",
        description="Check compatibility with the coordinator, upload the bundle with a "
                    "progress bar, resume after dropped connections, print the expert id.",
    )
    parser.add_argument("bundle", help="bundle folder")
    add_connection_flags(parser)
    parser.add_argument("--limit-rate", type=float, metavar="BYTES_PER_S",
                        help="upload no faster than this (for shared or metered links)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Upload the bundle; the expert id on the last line of stdout."""
    from contributor.client import CoordinatorClient  # grpc: see contributor.cli

    try:
        with CoordinatorClient(connection_from_args(args)) as client:
            result = client.submit(args.bundle, progress=not getattr(args, "quiet", False),
                                   limit_rate=getattr(args, "limit_rate", None))
    except KeyboardInterrupt:
        # Not cancelled here: an interrupted upload resumes, so only the user can abandon it.
        print(f"\ninterrupted: run submit again to resume, or `gaggle-contributor cancel "
              f"{args.bundle}` to free its upload slot at once", file=sys.stderr)
        return 130
    if result.already_stored:
        print(f"{result.name}: already stored; nothing new was sent")
    else:
        resumed = f", resumed at byte {result.resumed_from}" if result.resumed_from else ""
        print(f"{result.name}: accepted ({result.size_bytes} bytes; sent {result.bytes_sent} "
              f"in {result.attempts} attempt(s){resumed})")
    print(result.expert_id)
    return 0
