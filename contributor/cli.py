"""`gaggle-contributor`: train an expert and its gate, recycle an adapter, inspect, submit.

Heavy libraries (torch, peft, grpc) are imported inside each command, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from protocol.commands import run_handler

TOKEN_ENV = "GAGGLE_TOKEN"


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True,
                        help="base model: 'smollm2-135m', 'tiny-llama', or a local model folder")
    parser.add_argument("--data", required=True,
                        help='private training data, JSONL with {"input": ..., "target": ...}')
    parser.add_argument("--out", required=True,
                        help="where to write the bundle folder (must not exist yet)")
    parser.add_argument("--name", help="expert name (default: the --out folder's name)")
    parser.add_argument("--gate-steps", type=int, help="PHATGOOSE gate training steps")
    parser.add_argument("--max-length", type=int, help="truncate each example to this many tokens")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=int, help="examples per training step")
    parser.add_argument("--gate-lr", type=float, help="gate learning rate")
    parser.add_argument("--gate-accumulation", type=int,
                        help="micro-batches accumulated per gate step")
    parser.add_argument("--schedule", choices=("constant", "linear"),
                        help="learning rate after the warmup: constant, or a linear decay to "
                             "zero (default: constant)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (default 0: all cores, or 1 if the machine is busy)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                        help="matmul precision (default auto: bf16 autocast where the CPU runs "
                             "it natively, else fp32; weights and shipped tensors stay fp32)")
    parser.add_argument("--no-activations", action="store_true",
                        help="do not ship activations.safetensors (mean module inputs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaggle-contributor",
        description="Train an expert adapter and its PHATGOOSE gate on your private data, "
                    "then ship only the tensors to a gaggle coordinator.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train an expert (LoRA or (IA)^3) and its gate, write a bundle",
        description="Train an expert with peft on JSONL records (loss on target tokens only), "
                    "then train one PHATGOOSE gate vector per adapted module with the base "
                    "model and expert frozen, and write a bundle folder.",
    )
    _add_training_flags(train)
    train.add_argument("--method", choices=("lora", "ia3"), default="lora",
                       help="expert type (default lora)")
    train.add_argument("--steps", type=int, help="expert training steps")
    train.add_argument("--rank", type=int, help="LoRA rank")
    train.add_argument("--lr", type=float, help="expert learning rate")
    train.set_defaults(handler="contributor.train:run_train_command")

    gate = sub.add_parser(
        "gate", help="recycle an existing peft adapter: train only its gate",
        description="Load an existing peft adapter (adapter_config.json + "
                    "adapter_model.safetensors), or the expert of a gaggle bundle, train its "
                    "PHATGOOSE gate on your data and write a new bundle.",
    )
    gate.add_argument("--adapter", required=True,
                      help="folder of the existing peft adapter, or of a bundle (its expert is "
                           "kept as it is; its gates are trained again)")
    _add_training_flags(gate)
    gate.set_defaults(handler="contributor.train:run_gate_command")

    inspect = sub.add_parser("inspect", help="show a bundle's manifest and whether it validates")
    inspect.add_argument("bundle", help="bundle folder")
    inspect.add_argument("--base", help="also check against this base model")
    inspect.set_defaults(handler="contributor.inspect:run_inspect_command")

    submit = sub.add_parser(
        "submit", help="upload a bundle to a coordinator (resumable)",
        description="Check compatibility with the coordinator, upload the bundle with a "
                    "progress bar, resume after dropped connections, print the expert id.",
    )
    submit.add_argument("bundle", help="bundle folder")
    _add_connection_flags(submit)
    submit.add_argument("--limit-rate", type=float, metavar="BYTES_PER_S",
                        help="upload no faster than this (for shared or metered links)")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")
    submit.set_defaults(handler="contributor.client:run_submit_command")

    cancel = sub.add_parser(
        "cancel", help="abandon an interrupted upload of a bundle (instead of resuming it)",
        description="An interrupted `submit` resumes where it stopped when run again; "
                    "`cancel` instead deletes what the coordinator holds of the upload and "
                    "frees its slot at once (idle uploads otherwise expire after an hour).")
    cancel.add_argument("bundle", help="bundle folder")
    _add_connection_flags(cancel)
    cancel.set_defaults(handler="contributor.client:run_cancel_command")

    status = sub.add_parser("status", help="show the federation's base model and your experts")
    _add_connection_flags(status)
    status.set_defaults(handler="contributor.client:run_status_command")
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", required=True, help="coordinator address, HOST:PORT")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"contributor token (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to verify the coordinator's TLS")
    parser.add_argument("--tls-cert", help="client certificate (PEM), if the coordinator asks")
    parser.add_argument("--tls-key", help="private key (PEM) of --tls-cert")


def main(argv: list[str] | None = None) -> int:
    return run_handler(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
