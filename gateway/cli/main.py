"""`scopegate` entry point: argument parsing and exit codes.

Each command group lives in its own module with a `register(subparsers)` function; this module
only assembles them and maps failures to exit codes (DESIGN section 9): 0 ok, 1 the operation
failed or was denied, 2 usage or configuration error. Every command that reads a config takes
`--config` and falls back to $SCOPEGATE_CONFIG.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from gateway import __version__
from gateway.cli import (
    audit_cmd,
    completion_cmd,
    keys_cmd,
    oidc_cmd,
    policy_cmd,
    serve_cmd,
    store_cmd,
    token_cmd,
    whoami_cmd,
)
from gateway.cli.common import UsageError
from gateway.cli.helptext import decorate
from gateway.config import environment_warnings
from gateway.errors import ConfigError, GatewayError

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int] | int]
COMMAND_MODULES = [serve_cmd, token_cmd, whoami_cmd, keys_cmd, policy_cmd, audit_cmd, oidc_cmd, store_cmd,
                   completion_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scopegate", description="Scoped-token gateway for the Fly Machines API.")
    parser.add_argument("--version", action="version", version=f"scopegate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    decorate(parser)
    parser.set_defaults(root_parser=parser)  # for `scopegate completion`, which walks it
    return parser


# Commands that work on the files of a local config (keyring, store) and have no admin API
# counterpart: with SCOPEGATE_ADDR set, running them locally would act on another gateway's files
# than meant (or create empty ones), so they refuse.
LOCAL_ONLY = {"init": "creates the keyring and store", "store info": "reads the configured store",
              "keys list": "reads the keyring file", "keys rotate": "edits the keyring file",
              "keys retire": "edits the keyring file"}


def command_path(args: argparse.Namespace) -> str:
    action = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {action}" if action else str(args.command)


def refuse_remote(path: str) -> None:
    if path in LOCAL_ONLY and os.environ.get("SCOPEGATE_ADDR"):
        raise UsageError(f"`scopegate {path}` {LOCAL_ONLY[path]} of a local config; it cannot go through the gateway "
                         f"at SCOPEGATE_ADDR. Run it where the gateway's files are, without SCOPEGATE_ADDR "
                         f"(e.g. `env -u SCOPEGATE_ADDR scopegate {path} --config scopegate.yaml`)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    for warning in environment_warnings(os.environ):
        print(f"scopegate: warning: {warning}", file=sys.stderr)
    try:
        refuse_remote(command_path(args))
        result = handler(args)
        code = asyncio.run(result) if asyncio.iscoroutine(result) else result
    except ConfigError as exc:
        print(f"scopegate: configuration error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"scopegate: {exc}", file=sys.stderr)
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
