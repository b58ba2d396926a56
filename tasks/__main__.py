"""`python -m tasks list | export`: see the task suite and write a contributor's data file."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from protocol.errors import GaggleError
from tasks.registry import HELD_IN, HELD_OUT, RELATED, TASKS, split
from tasks.task import write_jsonl


def _role(name: str) -> str:
    if name in HELD_IN:
        return "held-in"
    if name in HELD_OUT:
        return "held-out (like " + ", ".join(RELATED.get(name, ())) + ")"
    return "extra"


def list_tasks(args: argparse.Namespace) -> int:
    """Print every task with its family, role and, with --sizes, its split sizes."""
    for name, task in TASKS.items():
        line = f"{name:20s} {task.family:16s} {_role(name)}"
        if args.sizes:
            parts = split(name, args.seed)
            line += (f"  train={len(parts.train)} validation={len(parts.validation)}"
                     f" test={len(parts.test)}")
        print(line)
    return 0


def export(args: argparse.Namespace) -> int:
    """Write one split of a task as `{"input", "target"}` JSONL, atomically."""
    examples = split(args.task, args.seed).get(args.split)
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        print(f"error: task {args.task!r} has no {args.split} examples to export; "
              "choose another split or task", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: a reader never sees half a file.
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        count = write_jsonl(examples, Path(staging))
        os.replace(staging, out)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    print(f"wrote {count} {args.split} examples of {args.task} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="show the tasks and the held-in/out partition")
    listing.add_argument("--sizes", action="store_true", help="also load and count splits")
    listing.add_argument("--seed", type=int, default=0, help="split seed (with --sizes)")
    listing.set_defaults(handler=list_tasks)
    exporting = commands.add_parser("export", help="write a split as contributor JSONL")
    exporting.add_argument("task", help="task name (see `list`)")
    exporting.add_argument("--split", default="train",
                           choices=("train", "validation", "test"))
    exporting.add_argument("--out", required=True, help="JSONL file to write")
    exporting.add_argument("--limit", type=int, default=None,
                           help="write at most this many examples")
    exporting.add_argument("--seed", type=int, default=0, help="split seed")
    exporting.set_defaults(handler=export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except GaggleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
