"""`scopegate` entry point: argument parsing and exit codes.

Exit codes (DESIGN section 9): 0 ok, 1 the operation failed or was denied, 2 usage or
configuration error. Every command that reads a config takes `--config` and falls back to
$SCOPEGATE_CONFIG.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from gateway import __version__
from gateway.cli import commands
from gateway.errors import ConfigError, GatewayError

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int] | int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scopegate", description="Scoped-token gateway for the Fly Machines API.")
    parser.add_argument("--version", action="version", version=f"scopegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="config file (default: $SCOPEGATE_CONFIG, else built-in defaults)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument("--dev", action="store_true",
                       help="ephemeral keys and store, a sandbox upstream in process; for trying Scopegate only")
    serve.add_argument("--host", help="address to bind (default server.host; --dev: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default server.port; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.set_defaults(handler=commands.serve)

    init = with_config(sub.add_parser("init", help="create keyring and store; print a bootstrap admin token once"))
    init.set_defaults(handler=commands.init)

    token = sub.add_parser("token", help="mint, list, show and revoke tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    mint = with_config(token_sub.add_parser("mint", help="mint a token; prints only the token unless --json"))
    mint.add_argument("--grant", action="append", required=True, metavar="ROLE@SCOPE",
                      help="e.g. deployer@app:web-staging, viewer@env:staging (repeatable)")
    mint.add_argument("--ttl", help="lifetime like 15m, 1h, 30d (default tokens.default_ttl)")
    mint.add_argument("--name", help="label shown in listings and audit records")
    mint.add_argument("--subject", help="principal, e.g. ci:github:acme/web (default: cli:$USER)")
    mint.add_argument("--json", action="store_true")
    mint.set_defaults(handler=commands.token_mint)

    listing = with_config(token_sub.add_parser("list", help="list token records (never token strings)"))
    listing.add_argument("--active", action="store_true", help="only tokens neither revoked nor expired")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=commands.token_list)

    show = with_config(token_sub.add_parser("show", help="show one token record"))
    show.add_argument("jti")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=commands.token_show)

    revoke = with_config(token_sub.add_parser("revoke", help="revoke a token and every token derived from it"))
    revoke.add_argument("jti")
    revoke.add_argument("--reason", help="why, kept in the record")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(handler=commands.token_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        result = handler(args)
        code = asyncio.run(result) if asyncio.iscoroutine(result) else result
    except ConfigError as exc:
        print(f"scopegate: configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"scopegate: {exc.message}", file=sys.stderr)
        # Bad input (a malformed grant, a ttl over the maximum) is a usage error.
        return 2 if exc.status == 400 else 1
    except KeyboardInterrupt:
        return 130
    assert isinstance(code, int)
    return code


if __name__ == "__main__":
    sys.exit(main())
