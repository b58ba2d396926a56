"""`gaggle-contributor inspect DIR`: show a bundle's manifest, modules and sizes; validate it."""

from __future__ import annotations

import argparse
from pathlib import Path

from protocol.errors import GaggleError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("inspect", help="show a bundle's manifest and whether it validates")
    parser.add_argument("bundle", help="bundle folder")
    parser.add_argument("--base", help="also check against this base model")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print what a bundle holds; exit 0 if it validates, 1 if it does not."""
    # torch and safetensors (protocol.bundle, routing.base): see contributor.cli
    from contributor.inspect import file_lines, manifest_lines, module_lines
    from protocol.bundle import load_bundle
    from routing.base import load_base

    root = Path(args.bundle)
    if not root.is_dir():
        print(f"error: {root} is not a bundle folder")
        return 1
    _print(manifest_lines(root) + file_lines(root))
    spec = load_base(args.base).spec() if args.base else None
    try:
        bundle = load_bundle(root, spec)
    except GaggleError as err:
        print(f"validates: NO: {err}")
        return 1
    _print(module_lines(bundle))
    against = f" against base model {spec.name!r}" if spec is not None else \
        " (format only; pass --base to check the base model)"
    print(f"validates: yes{against}")
    print(f"expert id: {bundle.expert_id}")
    return 0


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line)
