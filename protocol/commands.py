"""Running a CLI subcommand named "module:function", shared by both roles' entry points.

The handler's module is imported only when its command runs, so `--help` stays instant; a
GaggleError becomes a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from protocol.errors import GaggleError


def run_handler(args: argparse.Namespace) -> int:
    """Import and call `args.handler` ("module:function") with the parsed arguments."""
    module_name, function_name = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
        return int(handler(args) or 0)
    except GaggleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
