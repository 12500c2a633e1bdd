"""The CLI's commands in local mode; each returns an exit code."""

from __future__ import annotations

import argparse
import getpass
import sys
import time

from gateway.cli.local import LocalAdmin
from gateway.cli.output import print_json, print_record, print_table, record_row
from gateway.config import Config, load_config
from gateway.durations import parse_duration
from gateway.errors import ConfigError
from gateway.keyring import Keyring


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _ttl(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"--ttl: {exc}") from None


def serve(args: argparse.Namespace) -> int:
    from gateway.cli.serve import run_dev, run_server

    if args.workers < 1:
        raise ConfigError("--workers must be 1 or more")
    if args.dev:
        return run_dev(args)
    return run_server(_config(args), args)


async def init(args: argparse.Namespace) -> int:
    config = _config(args)
    created_keyring = not config.tokens_keyring.exists()
    keyring = Keyring.generate(config.tokens_keyring) if created_keyring else Keyring.load(config.tokens_keyring)
    if created_keyring:
        keyring.save()
        print(f"created keyring {config.tokens_keyring} (key {keyring.active.kid})", file=sys.stderr)
    admin = LocalAdmin.open(config, keyring)
    try:
        existing = [r for r in await admin.store.records() if "token-admin@gateway" in r.grants]
        if existing and not created_keyring:
            print("already initialized: keyring and store exist and hold a token-admin token.\n"
                  "Mint another with: scopegate token mint --grant token-admin@gateway --name NAME", file=sys.stderr)
            return 0
        minted = await admin.registry.mint(grants=["token-admin@gateway"], ttl_s=None, name="bootstrap-admin",
                                           subject=f"cli:{_user()}")
    finally:
        await admin.close()
    print(f"store ready at {config.store_url}", file=sys.stderr)
    print("bootstrap token-admin@gateway token (shown once; keep it secret):", file=sys.stderr)
    print(minted.token)
    return 0


async def token_mint(args: argparse.Namespace) -> int:
    config = _config(args)
    admin = LocalAdmin.open(config)
    try:
        minted = await admin.registry.mint(grants=args.grant, ttl_s=_ttl(args.ttl), name=args.name or "cli-token",
                                           subject=args.subject or f"cli:{_user()}")
    finally:
        await admin.close()
    if args.json:
        print_json({"token": minted.token, **minted.record.to_json()})
    else:
        print(minted.token)
    return 0


async def token_list(args: argparse.Namespace) -> int:
    admin = LocalAdmin.open(_config(args))
    try:
        records = await admin.store.records()
    finally:
        await admin.close()
    if args.active:
        now = int(time.time())
        records = [r for r in records if r.revoked_at is None and r.exp > now]
    if args.json:
        print_json([r.to_json() for r in records])
    elif records:
        print_table([record_row(r) for r in records])
    else:
        print("no tokens", file=sys.stderr)
    return 0


async def token_show(args: argparse.Namespace) -> int:
    admin = LocalAdmin.open(_config(args))
    try:
        record = await admin.registry.show(args.jti)
    finally:
        await admin.close()
    if args.json:
        print_json(record.to_json())
    else:
        print_record(record)
    return 0


async def token_revoke(args: argparse.Namespace) -> int:
    admin = LocalAdmin.open(_config(args))
    try:
        revoked = await admin.registry.revoke(args.jti, reason=args.reason)
    finally:
        await admin.close()
    if args.json:
        print_json({"revoked": revoked})
    elif revoked:
        print(f"revoked {len(revoked)} token(s): {' '.join(revoked)}")
    else:
        print(f"token {args.jti} was already revoked")
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
