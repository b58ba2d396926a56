"""`gaggle-coordinator token add|revoke|list`: contributor and admin tokens."""

from __future__ import annotations

import argparse

from coordinator.commands.options import store_option


def add_parser(sub) -> None:
    token = sub.add_parser("token", help="add, revoke or list contributor tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    add = token_sub.add_parser("add", help="create a contributor and print its token once")
    add.add_argument("name", help="contributor name")
    add.add_argument("--admin", action="store_true",
                     help="an admin token (token management and promote over gRPC)")
    add.add_argument("--rotate", action="store_true",
                     help="the name exists: issue it another token, keeping its role (a name "
                          "that exists is refused without this)")
    store_option(add, create=True)  # an operator adds tokens before the first serve
    revoke = token_sub.add_parser("revoke", help="revoke a contributor's tokens")
    revoke.add_argument("name", help="contributor name")
    store_option(revoke)
    listing = token_sub.add_parser("list", help="list contributors and token state")
    store_option(listing)
    token.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the domain modules import torch, grpc, Ray or MLflow: see coordinator.cli
    from coordinator.service.auth import TokenBook
    from coordinator.store.experts import Store

    book = TokenBook(Store(args.store))
    if args.token_command == "add":
        token = book.add(args.name, role="admin" if args.admin else "contributor",
                         rotate=args.rotate)
        print(f"{book.role(args.name)} token for {args.name} (shown once; store it safely):")
        print(token)
    elif args.token_command == "revoke":
        count = book.revoke(args.name)
        print(f"revoked {count} token(s) of {args.name}")
    else:
        rows = book.list()
        if not rows:
            print("no contributors yet: add one with `gaggle-coordinator token add NAME`")
        for name, role, live, revoked in rows:
            print(f"{name:<24} {role:<12} live tokens: {live}  revoked: {revoked}")
    return 0
