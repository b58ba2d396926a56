"""Options and output several coordinator commands share: --store, --tracking-uri, the Ray
flags, and the one line that says how a replay into MLflow went."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.tracking.tracker import Tracker


def store_option(parser: argparse.ArgumentParser, *, create: bool = False) -> None:
    """--store; unless `create`, the command refuses a folder that holds no store yet."""
    parser.add_argument("--store", required=True,
                        help="the coordinator's store folder" + (" (created if missing)"
                                                                 if create else ""))
    parser.set_defaults(store_must_exist=not create)


def tracking_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking server, http://HOST:PORT (default: where this "
                             "store's `serve` tracks, as it recorded it; else an embedded "
                             "SQLite store inside the store folder)")


def ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address",
                        help="join this Ray cluster (HOST:PORT, or ray://HOST:10001 through "
                             "Ray Client) instead of a local one")
    parser.add_argument("--ray-resource", dest="ray_resources", action="append",
                        metavar="NAME=AMOUNT",
                        help="custom Ray resource each assembly task and evaluation actor "
                             "asks for, pinning them to nodes started with it (repeatable)")


def replay_line(tracker: Tracker) -> str:
    """Replay queued tracking calls now; one line saying how it went."""
    result = tracker.replay()
    if result.pending:
        return (f"MLflow at {tracker.uri} unreachable ({result.error}): {result.pending} "
                "tracking calls stay queued and are replayed when it is back")
    return f"MLflow at {tracker.uri}: up to date ({result.replayed} calls sent)"
