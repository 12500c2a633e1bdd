"""`scopegate token mint|list|show|revoke|rotate|attenuate` (local or remote, see backend.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gateway.cli.backend import Backend, open_backend
from gateway.cli.common import add_config, add_json, current_user, duration_arg
from gateway.cli.output import RECORD_COLUMNS, print_json, print_mapping, print_table
from gateway.errors import ConfigError


def register(sub: Any) -> None:
    token = sub.add_parser("token", help="mint, list, show, revoke, rotate and attenuate tokens")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    mint = add_json(add_config(actions.add_parser("mint", help="mint a token; prints only the token unless --json")))
    mint.add_argument("--grant", action="append", required=True, metavar="ROLE@SCOPE",
                      help="e.g. deployer@app:web-staging, viewer@env:staging (repeatable)")
    mint.add_argument("--ttl", help="lifetime like 15m, 1h30m, 30d (default tokens.default_ttl)")
    mint.add_argument("--name", help="label shown in listings and audit records")
    mint.add_argument("--subject", help="principal, e.g. ci:github:acme/web (default: cli:$USER)")
    mint.set_defaults(handler=mint_token)

    listing = add_json(add_config(actions.add_parser("list", help="list token records (never token strings)")))
    listing.add_argument("--active", action="store_true", help="only tokens neither revoked nor expired")
    listing.set_defaults(handler=list_tokens)

    show = add_json(add_config(actions.add_parser("show", help="show one token record")))
    show.add_argument("jti")
    show.set_defaults(handler=show_token)

    revoke = add_json(add_config(actions.add_parser("revoke", help="revoke a token and every token derived from it")))
    revoke.add_argument("jti")
    revoke.add_argument("--reason", help="why; kept in the record")
    revoke.set_defaults(handler=revoke_token)

    rotate = add_json(add_config(actions.add_parser(
        "rotate", help="new token with the same grants; the old one keeps working for --grace")))
    rotate.add_argument("jti")
    rotate.add_argument("--grace", default="1h", help="how long the old token keeps working (default 1h; 0s: now)")
    rotate.set_defaults(handler=rotate_token)

    attenuate = add_json(add_config(actions.add_parser(
        "attenuate", help="narrow $SCOPEGATE_TOKEN into a child with fewer grants and a shorter life")))
    attenuate.add_argument("--grant", action="append", required=True, metavar="ROLE@SCOPE")
    attenuate.add_argument("--ttl", help="lifetime (at most the parent's remaining life)")
    attenuate.add_argument("--name", help="label for the child")
    attenuate.set_defaults(handler=attenuate_token)


async def _run(args: argparse.Namespace, work: Any) -> Any:
    backend: Backend = open_backend(args)
    try:
        return await work(backend)
    finally:
        await backend.close()


def _print_minted(args: argparse.Namespace, minted: dict[str, Any]) -> None:
    if args.json:
        print_json(minted)
    else:
        print(minted["token"])


async def mint_token(args: argparse.Namespace) -> int:
    ttl = duration_arg(args.ttl, "--ttl")
    minted = await _run(args, lambda b: b.mint(args.grant, ttl, args.name or "cli-token",
                                                args.subject or f"cli:{current_user()}"))
    _print_minted(args, minted)
    return 0


async def list_tokens(args: argparse.Namespace) -> int:
    records = await _run(args, lambda b: b.records(active=args.active))
    if args.json:
        print_json(records)
    elif records:
        print_table(records, RECORD_COLUMNS)
    else:
        print("no tokens", file=sys.stderr)
    return 0


async def show_token(args: argparse.Namespace) -> int:
    record = await _run(args, lambda b: b.show(args.jti))
    if args.json:
        print_json(record)
    else:
        print_mapping(record, RECORD_COLUMNS)
    return 0


async def revoke_token(args: argparse.Namespace) -> int:
    await _run(args, lambda b: b.revoke(args.jti, args.reason))
    if args.json:
        print_json({"revoked": args.jti})
    else:
        print(f"revoked {args.jti} and every token derived from it")
    return 0


async def rotate_token(args: argparse.Namespace) -> int:
    grace = duration_arg(args.grace, "--grace", allow_zero=True)
    minted = await _run(args, lambda b: b.rotate(args.jti, grace))
    _print_minted(args, minted)
    return 0


async def attenuate_token(args: argparse.Namespace) -> int:
    parent = os.environ.get("SCOPEGATE_TOKEN", "")
    if not parent:
        raise ConfigError("token attenuate narrows the token in SCOPEGATE_TOKEN; set it to the parent token")
    ttl = duration_arg(args.ttl, "--ttl")
    minted = await _run(args, lambda b: b.attenuate(parent, args.grant, ttl, args.name))
    _print_minted(args, minted)
    return 0
