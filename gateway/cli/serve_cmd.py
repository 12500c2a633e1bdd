"""`scopegate serve` and `scopegate init`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway import config_values
from gateway.cli.common import add_config, config_from, current_user
from gateway.cli.local import LocalAdmin
from gateway.cli.local_audit import LocalAudit
from gateway.core.keyring import Keyring
from gateway.errors import ConfigError
from gateway.store.redis import redact as redact_url


def register(sub: Any) -> None:
    serve = add_config(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument("--dev", action="store_true",
                       help="ephemeral keys and store, a sandbox upstream in process; for trying Scopegate only")
    serve.add_argument("--host", help="address to bind (default server.host; --dev: 127.0.0.1)")
    serve.add_argument("--port", type=port_arg, help="port to bind (default server.port; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.set_defaults(handler=serve_gateway)

    init = add_config(sub.add_parser("init", help="create keyring and store; print a bootstrap admin token once"))
    init.set_defaults(handler=init_gateway)


def port_arg(text: str) -> int:
    """A TCP port for argparse: 0 (a free one) to 65535; anything else is a usage error."""
    try:
        return config_values.port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 0 (a free one) to 65535") \
            from None


def serve_gateway(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError("--workers must be 1 or more")
    if args.dev:
        from gateway.dev.mode import run_dev  # the only import of the dev package outside it

        return run_dev(args)
    from gateway.cli.serve import run_server

    return run_server(config_from(args), args)


async def init_gateway(args: argparse.Namespace) -> int:
    config = config_from(args)
    created_keyring = not config.tokens_keyring.exists()
    keyring = Keyring.generate(config.tokens_keyring) if created_keyring else Keyring.load(config.tokens_keyring)
    if created_keyring:
        keyring.save()
        print(f"created keyring {config.tokens_keyring} (key {keyring.active.kid})", file=sys.stderr)
    admin = LocalAdmin.open(config, keyring)
    audit = LocalAudit.open(config, admin.store)
    try:
        existing = [r for r in await admin.store.records() if "token-admin@gateway" in r.grants]
        if existing and not created_keyring:
            print("already initialized: keyring and store exist and hold a token-admin token.\n"
                  "Mint another with: scopegate token mint --grant token-admin@gateway --name NAME", file=sys.stderr)
            return 0
        async with audit.action("gateway:mint", "init") as record:
            minted = await admin.registry.mint(grants=["token-admin@gateway"], ttl_s=None, name="bootstrap-admin",
                                               subject=f"cli:{current_user()}")
            record.reason, record.status = f"minted {minted.record.jti} (token-admin@gateway, bootstrap)", 201
    finally:
        await audit.close()
        await admin.close()
    print(f"store ready at {redact_url(config.store_url)}", file=sys.stderr)
    print("bootstrap token-admin@gateway token (shown once; keep it secret):", file=sys.stderr)
    print(minted.token)
    return 0
