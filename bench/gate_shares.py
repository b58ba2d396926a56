"""Do the router keys tell the tasks apart? Own-expert top-1 shares of a set of task experts.

Each bundle must be named after the registered task it was trained on (tasks.registry), as
the zero-shot benchmark's contributors are. The bundles are stacked into one router, which
runs over each task's validation examples (prompt + correct answer); for every task the
share of token-module pairs whose top-1 expert is the task's own is printed twice:

- over all tokens, as the zero-shot benchmark's diagnostics report it;
- over the scored positions only: the last prompt token and the answer tokens but the last.
  Their next-token predictions are what rank classification scores, and they are the only
  positions where the target loss reaches a gate directly during gate training.

Chance is 1/N for N experts. This takes a minute or two on SmolLM2, against an hour and a
half for the full benchmark, so a gate recipe can be compared on experts trained once:

    python -m bench.gate_shares runs/<zeroshot run>/store/experts [--examples 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.zeroshot.diagnostics import own_shares
from protocol.bundle import MANIFEST, load_bundle
from protocol.errors import GaggleError, InvalidArgument
from routing.base import load_base
from routing.methods import KEY_METHODS
from routing.stack import stack_experts
from tasks.registry import get_task, split

METHODS = KEY_METHODS  # gates, then mean activations


def bundle_dirs(paths: list[str]) -> list[Path]:
    """The bundles named on the command line: bundle folders, or folders holding them."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / MANIFEST).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
        else:
            raise InvalidArgument(f"{path} is neither a bundle nor a folder of bundles",
                                  field="bundles")
    if len(found) < 2:
        raise InvalidArgument(f"found {len(found)} bundle(s) in {paths}: the shares compare "
                              "at least two task experts", field="bundles")
    return found


def gate_shares(base_name: str, paths: list[Path], *, examples: int = 32,
                max_length: int = 192, seed: int = 0,
                methods: tuple[str, ...] = METHODS) -> dict:
    """method -> task -> {"overall", "scored", "per_layer"} own-expert top-1 shares."""
    bundles = [load_bundle(path) for path in paths]
    for bundle in bundles:
        try:
            get_task(bundle.name)
        except InvalidArgument as err:
            raise InvalidArgument(f"bundle {bundle.name!r} is not named after a registered "
                                  f"task ({err}): name each expert after the task it was "
                                  "trained on", field="bundles") from None
    if "average_activation" in methods and any(b.activations is None for b in bundles):
        methods = tuple(m for m in methods if m != "average_activation")
    validation = {b.name: split(b.name, seed).validation[:examples] for b in bundles}
    return own_shares(load_base(base_name), stack_experts(bundles), validation, methods,
                      max_length=max_length)


def table(shares: dict) -> str:
    methods = list(shares)
    tasks = list(shares[methods[0]])
    lines = [f"own-expert top-1 share, all tokens / scored positions (chance {1 / len(tasks):.3f})",
             f"{'task':24s}" + "".join(f"{m:>24s}" for m in methods)]
    for task in tasks:
        lines.append(f"{task:24s}" + "".join(
            f"{shares[m][task]['overall']:>15.2f} / {shares[m][task]['scored']:.2f}"
            for m in methods))
    for label, pick in (("mean", lambda v: sum(v) / len(v)), ("min", min)):
        lines.append(f"{label:24s}" + "".join(
            f"{pick([shares[m][t]['overall'] for t in tasks]):>15.2f} / "
            f"{pick([shares[m][t]['scored'] for t in tasks]):.2f}" for m in methods))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gate_shares",
        description="Own-expert top-1 shares of task experts' router keys, on each task's "
                    "validation examples: over all tokens and over the scored positions.")
    parser.add_argument("bundles", nargs="+", help="bundle folders, or folders holding them; "
                        "each bundle named after its registered task")
    parser.add_argument("--base", default="smollm2-135m", help="base model (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=32,
                        help="validation examples per task (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=192,
                        help="tokens kept per prompt + answer (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--json", help="also write the shares to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shares = gate_shares(args.base, bundle_dirs(args.bundles), examples=args.examples,
                             max_length=args.max_length, seed=args.seed)
    except GaggleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(shares))
    if args.json:
        Path(args.json).write_text(json.dumps(shares, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
