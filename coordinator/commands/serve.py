"""`gaggle-coordinator serve`: run the gRPC coordinator service."""

from __future__ import annotations

import argparse
import logging

from coordinator.commands.options import ray_options, tracking_option

# Settings with no flag, for the --config file: (name, default, meaning). The defaults are
# ServerConfig's (tests/coordinator/test_cli.py holds them equal); written out here so that
# --help does not import the server.
FILE_ONLY = (
    ("max_bundle_bytes", "536870912", "largest upload archive accepted"),
    ("max_concurrent_uploads", "4", "unfinished uploads per contributor"),
    ("upload_idle_timeout_s", "3600.0", "an upload with no bytes for this long expires"),
    ("stream_idle_timeout_s", "60.0", "a stream that sends nothing this long is cancelled"),
    ("min_upload_rate", "16384.0", "bytes/s a stream must average (it may resume if cut)"),
    ("upload_rate_grace_s", "30.0", "how old a stream is before its rate counts"),
    ("store_quota_bytes", "none", "stored plus in-flight archive bytes, all contributors"),
    ("max_update_ratio", "100.0", "largest ||dW|| of a module over its base weight's (0: none)"),
    ("max_workers", "16", "calls handled at once (one thread each)"),
    ("max_streams", "none", "upload streams at once, all contributors (max_workers - 4)"),
    ("max_calls_per_contributor", "4", "one contributor's calls in flight"),
    ("grace_s", "10.0", "how long SIGTERM waits for calls in flight"),
    ("auth_max_failures", "10", "failed authentications per host and window"),
    ("auth_window_s", "60.0", "how long a failed authentication counts against its host"),
)


def add_parser(sub) -> None:
    epilog = "settings only in the --config file (TOML), with their defaults:\n" + "\n".join(
        f"  {name} = {default}".ljust(40) + meaning for name, default, meaning in FILE_ONLY)
    serve_ = sub.add_parser("serve", help="run the gRPC coordinator service", epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
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
    serve_.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this port (0: any free one)")
    serve_.add_argument("--metrics-host",
                        help="address the metrics listen on (default 127.0.0.1)")
    serve_.add_argument("--metrics-contributors", action="store_true", default=None,
                        help="label upload metrics with contributor names (one series each)")
    serve_.add_argument("--no-assembly", dest="assembly", action="store_false", default=None,
                        help="only store experts: no automatic assembly or MLflow tracking")
    serve_.add_argument("--eval-config",
                        help="TOML/JSON evaluation config: evaluate each new version on "
                             "public tasks and record the accuracies "
                             "(see coordinator.checks.evaluation)")
    serve_.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.server import ServerConfig, serve, start_assembly

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig.from_args(args)
    serve(config, start_assembly(config))
    return 0
