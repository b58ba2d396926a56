"""Command-line flags that several contributor commands share: training, and the coordinator."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contributor.client import Connection

TOKEN_ENV = "GAGGLE_TOKEN"


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `train` and `gate`: base model, data, output and the training recipe."""
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
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]|mps",
                        help="where the base model runs (default auto: a GPU if there is one)")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "float32", "bfloat16", "float16"),
                        help="the base weights' dtype (default auto: bfloat16 on a GPU that "
                             "supports it, else float32); adapters and gates stay float32")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, "
                             "about a third more compute per step")
    parser.add_argument("--progress-file", metavar="PATH",
                        help="also append each step (phase, step, total, loss, ETA) to PATH as "
                             "a JSON line, for a program to follow")
    parser.add_argument("--quantize", choices=("4bit",),
                        help="load the base in 4 bits (bitsandbytes, CUDA only; pip install "
                             "'gaggle[quant]')")


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that talk to a coordinator: its address, token and TLS."""
    parser.add_argument("--coordinator", required=True, help="coordinator address, HOST:PORT")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"contributor token (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to verify the coordinator's TLS")
    parser.add_argument("--tls-cert", help="client certificate (PEM), if the coordinator asks")
    parser.add_argument("--tls-key", help="private key (PEM) of --tls-cert")


def connection_from_args(args: argparse.Namespace) -> Connection:
    """The Connection that the connection flags describe."""
    from contributor.client import Connection  # grpc: see contributor.cli on start-up time

    def path(name: str) -> Path | None:
        value = getattr(args, name, None)
        return Path(value) if value else None

    return Connection(address=args.coordinator, token=args.token, tls_ca=path("tls_ca"),
                      tls_cert=path("tls_cert"), tls_key=path("tls_key"))
