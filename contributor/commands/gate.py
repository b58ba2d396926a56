"""`gaggle-contributor gate`: recycle an existing peft adapter or bundle, training only its gate."""

from __future__ import annotations

import argparse
from pathlib import Path

from contributor.commands.flags import add_training_flags
from contributor.commands.train import print_written


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "gate", help="recycle an existing peft adapter: train only its gate",
        description="Load an existing peft adapter (adapter_config.json + "
                    "adapter_model.safetensors), or the expert of a gaggle bundle, train its "
                    "PHATGOOSE gate on your data and write a new bundle.",
    )
    parser.add_argument("--adapter", required=True,
                        help="folder of the existing peft adapter, a Hugging Face id of one "
                             "already in the local cache (nothing is downloaded), or a bundle "
                             "folder (its expert is kept as it is; its gates are trained again)")
    add_training_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train a gate for the adapter and write the bundle folder --out."""
    # torch and peft: see contributor.cli
    from contributor.train import config_from_args, recycle_bundle

    config = config_from_args(args)
    bundle = recycle_bundle(args.base, args.adapter, args.data, args.out, args.name, config)
    print_written(Path(args.out), bundle)
    return 0
