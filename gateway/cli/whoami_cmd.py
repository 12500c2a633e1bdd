"""`scopegate whoami`: the caller's own token — grants, expiry, parent, state, what it may do.

The token is `--token` (or '-': stdin), else $SCOPEGATE_TOKEN. With $SCOPEGATE_ADDR the gateway
answers (`GET /_gateway/v1/token/self`, open to any valid token); without it the config's keyring
verifies the token and its store says whether it still lives, so the answer is never a decode of
unverified claims. The token itself is never printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from typing import Any

import yaml

from gateway.cli.backend import caller_backend
from gateway.cli.common import add_config
from gateway.cli.output import print_json
from gateway.cli.token_view import relative
from gateway.errors import ConfigError


def register(sub: Any) -> None:
    whoami = add_config(sub.add_parser("whoami", help="show your own token: grants, expiry, parent, what it may do"))
    whoami.add_argument("--token", help="the token to describe; '-' reads it from stdin, which other local users "
                                        "cannot see in the process list (default $SCOPEGATE_TOKEN)")
    whoami.add_argument("-o", "--output", choices=("table", "json", "yaml"), default=None,
                        help="table (default), json or yaml")
    whoami.add_argument("--json", action="store_true", help="same as -o json")
    whoami.set_defaults(handler=describe_token)


def _token(flag: str | None) -> tuple[str, str]:
    if flag == "-":
        return sys.stdin.readline().strip(), "the token read from stdin"
    if flag is not None:
        return flag.strip(), "--token"
    token = os.environ.get("SCOPEGATE_TOKEN", "").strip()
    if not token:
        raise ConfigError("whoami describes a token: set SCOPEGATE_TOKEN or pass --token TOKEN ('-' reads stdin)")
    return token, "SCOPEGATE_TOKEN"


def _stamp(value: int | None, now: int) -> str:
    if value is None:
        return "-"
    return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(value))} ({relative(value, now)})"


def _print_human(me: dict[str, Any]) -> None:
    now = int(time.time())
    out = sys.stdout
    for label, value in (("name", me["name"]), ("jti", me["jti"]), ("subject", me["sub"]), ("state", me["state"]),
                         ("issued", _stamp(me["iat"], now)), ("expires", _stamp(me["exp"], now)),
                         ("parent", me.get("parent") or "-"), ("last used", _stamp(me.get("last_used_at"), now))):
        out.write(f"{label + ':':11}{value}\n")
    out.write("grants:\n")
    for grant in me["grants"]:
        out.write(f"  {grant}\n")
    out.write("may:\n")
    width = max(60, min(shutil.get_terminal_size().columns, 120))
    for row in me["may"]:
        where = "" if row["env"] is None else f" (environment {row['env']})"
        out.write(textwrap.fill(f"{row['grant']}{where}: {', '.join(row['actions']) or 'nothing'}", width=width,
                                initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False) + "\n")
    out.write("`scopegate policy explain --token ... METHOD PATH` gives the definite answer for one request.\n")


async def describe_token(args: argparse.Namespace) -> int:
    if args.json and args.output not in (None, "json"):
        raise ConfigError(f"--json and -o {args.output} disagree; give one of them")
    token, source = _token(args.token)
    try:
        backend = caller_backend(args, token, source)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; whoami without SCOPEGATE_ADDR verifies the token with the local config's keyring "
                          "and store: set SCOPEGATE_ADDR to ask the gateway instead") from None
    try:
        me = await backend.whoami(token)
    finally:
        await backend.close()
    how = "json" if args.json else args.output or "table"
    if how == "json":
        print_json(me)
    elif how == "yaml":
        sys.stdout.write(yaml.safe_dump(me, sort_keys=True))
    else:
        _print_human(me)
    return 0
