"""`gaggle-coordinator promote V`: move alias `champion` (an older version rolls back).

Refuses, unless --force, a version whose mean evaluation accuracy lies more than the threshold
below the champion's (--max-drop, else the evaluation config's `max_drop`): the rule of
coordinator.versions.promotion, which the Admin service applies too.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from coordinator.commands.options import replay_line, store_option, tracking_option


def add_parser(sub) -> None:
    promote = sub.add_parser("promote", help="move the 'champion' alias to a version")
    promote.add_argument("version", help="version id (an older one rolls back)")
    promote.add_argument("--force", action="store_true",
                         help="promote even if its evaluation is worse than the champion's")
    promote.add_argument("--max-drop", type=float,
                         help="largest allowed drop in mean accuracy below the champion "
                              "(default: the evaluation config's max_drop, else 0.01)")
    store_option(promote)
    tracking_option(promote)
    promote.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.tracking.tracker import Tracker
    from coordinator.versions.promotion import promote_version

    tracker = Tracker(args.store, args.tracking_uri)
    version_id, _, note = promote_version(args.store, args.version, force=args.force,
                                          by=f"{getpass.getuser()} (CLI)", tracker=tracker,
                                          max_drop=args.max_drop)
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"champion -> {version_id}")
    print(replay_line(tracker))
    return 0
