"""`gaggle-coordinator serve`: run the gRPC coordinator service."""

from __future__ import annotations

import argparse
import logging

from coordinator.commands.options import ray_options, tracking_option


def add_parser(sub) -> None:
    serve_ = sub.add_parser("serve", help="run the gRPC coordinator service")
    serve_.add_argument("--config", help="TOML file holding any of these settings")
    serve_.add_argument("--store", help="the coordinator's store folder (created if missing)")
    serve_.add_argument("--base", help="the federation's base model name or folder")
    serve_.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve_.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    serve_.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    serve_.add_argument("--tls-key", help="server private key (PEM)")
    serve_.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    tracking_option(serve_)
    ray_options(serve_)
    serve_.add_argument("--device", metavar="auto|cpu|cuda[:N]|mps",
                        help="where evaluation and the usage check run the base model "
                             "(default auto: a GPU if there is one)")
    serve_.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        help="the base weights' dtype there (default auto: bf16 on a GPU)")
    serve_.add_argument("--no-assembly", dest="assembly", action="store_false", default=None,
                        help="only store experts: no automatic assembly or MLflow tracking")
    serve_.add_argument("--eval-config",
                        help="TOML/JSON evaluation config: evaluate each new version on "
                             "public tasks and record the accuracies "
                             "(see coordinator.checks.evaluation)")
    serve_.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.server import ServerConfig, accepted_hook, serve

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig.from_args(args)
    serve(config, accepted_hook(config))
    return 0
