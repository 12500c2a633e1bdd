"""`scopegate token mint|list|show|revoke|rotate|attenuate` (local or remote, see backend.py).

`show`, `revoke` and `rotate` take a jti, a unique jti prefix or a token name (token_view.py).
`attenuate` narrows a token the caller holds: `--token`, else $SCOPEGATE_PARENT_TOKEN, else
$SCOPEGATE_TOKEN; it needs no admin token, and with $SCOPEGATE_ADDR it asks that gateway.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gateway.cli.backend import Backend, caller_backend, open_backend
from gateway.cli.common import UsageError, add_config, add_json, current_user, duration_arg
from gateway.cli.output import print_json
from gateway.cli.token_view import STATES_HELP, add_output, print_record, print_records, resolve
from gateway.core.token_query import STATES, TokenFilter
from gateway.errors import ConfigError

TOKEN_REF = "jti, a unique jti prefix (4+ characters) or the token's name"


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

    listing = add_output(add_config(actions.add_parser("list", help="list token records (never token strings)")))
    listing.add_argument("--grant", metavar="ROLE@SCOPE", help="only tokens carrying exactly this grant")
    listing.add_argument("--app", help="only tokens whose grants cover this app (env: grants by its environment)")
    listing.add_argument("--subject", help="only tokens of this subject, or a glob of it (ci:github:acme/*)")
    listing.add_argument("--state", choices=STATES, help=STATES_HELP)
    listing.add_argument("--active", action="store_true", help="same as --state active")
    listing.set_defaults(handler=list_tokens)

    show = add_output(add_config(actions.add_parser("show", help="show one token record")))
    show.add_argument("jti", metavar="TOKEN", help=TOKEN_REF)
    show.set_defaults(handler=show_token)

    revoke = add_json(add_config(actions.add_parser("revoke", help="revoke a token and every token derived from it")))
    revoke.add_argument("jti", metavar="TOKEN", help=TOKEN_REF)
    revoke.add_argument("--reason", help="why; kept in the record")
    revoke.set_defaults(handler=revoke_token)

    rotate = add_json(add_config(actions.add_parser(
        "rotate", help="new token with the same grants; the old one keeps working for --grace")))
    rotate.add_argument("jti", metavar="TOKEN", help=TOKEN_REF)
    rotate.add_argument("--grace", default="1h", help="how long the old token keeps working (default 1h; 0s: now)")
    rotate.set_defaults(handler=rotate_token)

    attenuate = add_json(add_config(actions.add_parser(
        "attenuate", help="narrow a token you hold into a child with fewer grants and a shorter life")))
    attenuate.add_argument("--grant", action="append", required=True, metavar="ROLE@SCOPE",
                           help="a grant within the parent's (repeatable)")
    attenuate.add_argument("--token", metavar="PARENT",
                           help="the parent token; '-' reads it from stdin, which other local users cannot see "
                                "in the process list (default $SCOPEGATE_PARENT_TOKEN, else $SCOPEGATE_TOKEN)")
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
    if args.active and args.state not in (None, "active"):
        raise UsageError(f"--active and --state {args.state} disagree; give one of them")
    wanted = TokenFilter(grant=args.grant, app=args.app, subject=args.subject,
                         state="active" if args.active else args.state)
    print_records(args, await _run(args, lambda b: b.records(wanted)))
    return 0


async def _named(backend: Backend, ref: str) -> dict[str, Any]:
    return resolve(ref, await backend.records(TokenFilter()))


async def show_token(args: argparse.Namespace) -> int:
    print_record(args, await _run(args, lambda b: _named(b, args.jti)))
    return 0


async def revoke_token(args: argparse.Namespace) -> int:
    async def work(backend: Backend) -> dict[str, Any]:
        record = await _named(backend, args.jti)
        await backend.revoke(record["jti"], args.reason)
        return record

    record = await _run(args, work)
    if args.json:
        print_json({"revoked": record["jti"]})
    else:
        print(f"revoked {record['jti']} and every token derived from it")
    return 0


async def rotate_token(args: argparse.Namespace) -> int:
    grace = duration_arg(args.grace, "--grace", allow_zero=True)

    async def work(backend: Backend) -> dict[str, Any]:
        return await backend.rotate((await _named(backend, args.jti))["jti"], grace)

    _print_minted(args, await _run(args, work))
    return 0


def parent_token(flag: str | None) -> tuple[str, str]:
    """The token to narrow, and where it came from (for messages; never the token itself)."""
    if flag == "-":
        token, source = sys.stdin.readline().strip(), "the token read from stdin"
    elif flag is not None:
        token, source = flag.strip(), "--token"
    elif os.environ.get("SCOPEGATE_PARENT_TOKEN"):
        token, source = os.environ["SCOPEGATE_PARENT_TOKEN"].strip(), "SCOPEGATE_PARENT_TOKEN"
    else:
        token, source = os.environ.get("SCOPEGATE_TOKEN", "").strip(), "SCOPEGATE_TOKEN"
        if token:
            # The admin token's variable, kept for scripts written before SCOPEGATE_PARENT_TOKEN: say so.
            print("scopegate: narrowing the token in SCOPEGATE_TOKEN (set SCOPEGATE_PARENT_TOKEN or pass --token "
                  "to narrow another)", file=sys.stderr)
    if not token:
        raise ConfigError("token attenuate needs the token to narrow: pass --token PARENT (or '-' to read it from "
                          "stdin), or set SCOPEGATE_PARENT_TOKEN (SCOPEGATE_TOKEN is used when neither is given)")
    return token, source


async def attenuate_token(args: argparse.Namespace) -> int:
    parent, source = parent_token(args.token)
    ttl = duration_arg(args.ttl, "--ttl")
    # Any valid token may narrow itself: the gateway is asked with the parent, no admin token needed.
    backend = caller_backend(args, parent, source)
    try:
        minted = await backend.attenuate(parent, args.grant, ttl, args.name)
    finally:
        await backend.close()
    _print_minted(args, minted)
    return 0
