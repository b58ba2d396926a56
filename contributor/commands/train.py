"""`gaggle-contributor train`: train an expert and its gate on private data, write a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from contributor.commands.flags import add_training_flags

if TYPE_CHECKING:
    from protocol.bundle import Bundle


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train", help="train an expert (LoRA or (IA)^3) and its gate, write a bundle",
        description="Train an expert with peft on JSONL records (loss on target tokens only), "
                    "then train one PHATGOOSE gate vector per adapted module with the base "
                    "model and expert frozen, and write a bundle folder.",
    )
    add_training_flags(parser)
    parser.add_argument("--method", choices=("lora", "ia3"), default="lora",
                        help="expert type (default lora)")
    parser.add_argument("--steps", type=int, help="expert training steps")
    parser.add_argument("--rank", type=int, help="LoRA rank")
    parser.add_argument("--lr", type=float, help="expert learning rate")
    parser.add_argument("--target-modules", metavar="NAMES|REGEX",
                        help="modules to adapt, in peft's form: comma-separated names "
                             "(q_proj,v_proj), a regex over full module names, or all-linear "
                             "(default: all-linear for LoRA, peft's default for (IA)^3)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Train the expert, then its gate, and write the bundle folder --out."""
    # torch and peft: see contributor.cli
    from contributor.train import config_from_args, train_bundle

    config = config_from_args(args)
    bundle = train_bundle(args.base, args.data, args.out, args.name, config)
    print_written(Path(args.out), bundle)
    return 0


def print_written(out: Path, bundle: Bundle) -> None:
    """One line about the bundle folder just written."""
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {bundle.manifest.method} expert {bundle.name!r}, "
          f"{len(bundle.modules)} modules, {size / 1e6:.2f} MB, expert id "
          f"{bundle.expert_id[:12]}")
