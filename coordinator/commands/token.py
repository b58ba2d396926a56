"""`gaggle-coordinator token add|role|revoke|list`: contributor and admin tokens."""

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
                          "that exists is refused without this); its other tokens stay valid")
    add.add_argument("--revoke-others", action="store_true",
                     help="with --rotate: revoke the name's other tokens at once")
    store_option(add, create=True)  # an operator adds tokens before the first serve
    role = token_sub.add_parser("role", help="change a name's role (its tokens follow)")
    role.add_argument("name", help="contributor name")
    role.add_argument("role", choices=("contributor", "admin"))
    store_option(role)
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
        live_before = {n: live for n, _, live, _ in book.list()}.get(args.name, 0)
        token = book.add(args.name, role="admin" if args.admin else None,
                         rotate=args.rotate, revoke_others=args.revoke_others)
        if args.rotate and live_before:
            print(f"{live_before} older token(s) of {args.name} "
                  + ("revoked" if args.revoke_others else
                     "stay valid: `gaggle-coordinator token add NAME --rotate "
                     "--revoke-others` or `token revoke NAME` ends them"))
        print(f"{book.role(args.name)} token for {args.name} (shown once; store it safely):")
        print(token)
    elif args.token_command == "role":
        held = book.set_role(args.name, args.role)
        print(f"{args.name}: {held} -> {args.role} (every token of the name, from its next "
              "call)")
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
