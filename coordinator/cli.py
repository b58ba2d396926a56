"""`gaggle-coordinator`: serve, manage tokens, list experts, assemble and manage versions.

Heavy libraries (torch, grpc, ray, mlflow) are imported inside each command.
"""

from __future__ import annotations

import argparse
import sys

from protocol.commands import run_handler
from protocol.errors import GaggleError


def _store(parser: argparse.ArgumentParser, *, create: bool = False) -> None:
    """--store; unless `create`, the command refuses a folder that holds no store yet."""
    parser.add_argument("--store", required=True,
                        help="the coordinator's store folder" + (" (created if missing)"
                                                                 if create else ""))
    parser.set_defaults(store_must_exist=not create)


def _tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking server, http://HOST:PORT (default: an embedded "
                             "SQLite store inside the store folder)")


def _ray(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address",
                        help="join this Ray cluster (HOST:PORT, or ray://HOST:10001 through "
                             "Ray Client) instead of a local one")
    parser.add_argument("--ray-resource", dest="ray_resources", action="append",
                        metavar="NAME=AMOUNT",
                        help="custom Ray resource each assembly task and evaluation actor "
                             "asks for, pinning them to nodes started with it (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaggle-coordinator",
        description="Collect expert bundles over gRPC, validate and store them, assemble "
                    "PHATGOOSE router versions with Ray and track them in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gRPC coordinator service")
    serve.add_argument("--config", help="TOML file holding any of these settings")
    serve.add_argument("--store", help="the coordinator's store folder (created if missing)")
    serve.add_argument("--base", help="the federation's base model name or folder")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    serve.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    _tracking(serve)
    _ray(serve)
    serve.add_argument("--device", metavar="auto|cpu|cuda[:N]|mps",
                       help="where evaluation and the usage check run the base model "
                            "(default auto: a GPU if there is one)")
    serve.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       help="the base weights' dtype there (default auto: bf16 on a GPU)")
    serve.add_argument("--no-assembly", dest="assembly", action="store_false", default=None,
                       help="only store experts: no automatic assembly or MLflow tracking")
    serve.add_argument("--eval-config",
                       help="TOML/JSON evaluation config: evaluate each new version on public "
                            "tasks and record the accuracies (see coordinator.checks.evaluation)")
    serve.set_defaults(handler="coordinator.server:run_serve_command")

    token = sub.add_parser("token", help="add, revoke or list contributor tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    add = token_sub.add_parser("add", help="create a contributor and print its token once")
    add.add_argument("name", help="contributor name")
    add.add_argument("--admin", action="store_true",
                     help="an admin token (token management and promote over gRPC)")
    add.add_argument("--rotate", action="store_true",
                     help="the name exists: issue it another token, keeping its role (a name "
                          "that exists is refused without this)")
    _store(add, create=True)  # an operator adds tokens before the first serve
    revoke = token_sub.add_parser("revoke", help="revoke a contributor's tokens")
    revoke.add_argument("name", help="contributor name")
    _store(revoke)
    listing = token_sub.add_parser("list", help="list contributors and token state")
    _store(listing)
    token.set_defaults(handler="coordinator.service.auth:run_token_command")

    experts = sub.add_parser("experts", help="list stored experts")
    _store(experts)
    experts.set_defaults(handler="coordinator.store.experts:run_experts_command")

    assemble = sub.add_parser("assemble", help="assemble a router version from all experts")
    _store(assemble)
    _tracking(assemble)
    _ray(assemble)
    assemble.set_defaults(handler="coordinator.commands.versions:run_assemble_command")

    versions = sub.add_parser("versions", help="list router versions")
    _store(versions)
    _tracking(versions)
    versions.add_argument("--json", action="store_true", help="print the list as JSON")
    versions.set_defaults(handler="coordinator.commands.versions:run_versions_command")

    diff = sub.add_parser("diff", help="experts added, removed and changed between versions")
    diff.add_argument("old", help="older version id")
    diff.add_argument("new", help="newer version id")
    _store(diff)
    diff.add_argument("--json", action="store_true", help="print the diff as JSON")
    diff.set_defaults(handler="coordinator.commands.versions:run_diff_command")

    promote = sub.add_parser("promote", help="move the 'champion' alias to a version")
    promote.add_argument("version", help="version id (an older one rolls back)")
    promote.add_argument("--force", action="store_true",
                         help="promote even if its evaluation is worse than the champion's")
    promote.add_argument("--max-drop", type=float,
                         help="largest allowed drop in mean accuracy below the champion "
                              "(default: the evaluation config's max_drop, else 0.01)")
    _store(promote)
    _tracking(promote)
    promote.set_defaults(handler="coordinator.commands.versions:run_promote_command")

    evaluate = sub.add_parser("evaluate", help="evaluate versions on public tasks now")
    evaluate.add_argument("versions", nargs="+", metavar="VERSION", help="version ids")
    _store(evaluate)
    evaluate.add_argument("--eval-config", required=True,
                          help="TOML/JSON evaluation config (see coordinator/checks/evaluation.py)")
    _tracking(evaluate)
    _ray(evaluate)
    evaluate.set_defaults(handler="coordinator.checks.evaluation:run_evaluate_command")

    export = sub.add_parser("export", help="write a self-contained router version")
    export.add_argument("version", help="version id")
    export.add_argument("--out", required=True, help="output folder (must not exist)")
    _store(export)
    export.set_defaults(handler="coordinator.commands.versions:run_export_command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "store_must_exist", False):
        # Before the handler runs: opening a store creates one, so a mistyped --store would
        # otherwise leave an empty store behind and report that it holds nothing.
        from coordinator.store.experts import require_store

        try:
            require_store(args.store)
        except GaggleError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
