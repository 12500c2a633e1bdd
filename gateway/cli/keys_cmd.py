"""`scopegate keys list|rotate|retire KID [--force]`: the signing keyring, edited in place.

A running gateway watches the keyring file and picks changes up within a second: after
`rotate` new tokens are signed with the new key while older keys keep verifying until their
tokens expire; `retire` stops a key from verifying anything, so it is refused while the key
still verifies live tokens (unless `--force`).

Which tokens a key signed: a key signs from its creation until the next key's (rotation appends
the new key), and token records keep `iat`, so the live tokens (not revoked, not expired) issued
in that window are the ones retiring it would break. The window runs a few seconds past the
rotation: a running gateway may sign with the old key until it has reloaded the keyring. Key
changes are admin actions and audited like the others (local_audit.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from typing import Any

from gateway.cli.common import add_config, add_json, config_from
from gateway.cli.local_audit import LocalAudit
from gateway.cli.output import print_json, print_table
from gateway.core.keyring import Keyring, SigningKey, new_key
from gateway.errors import ConfigError, Forbidden, NotFound, StateUnavailable
from gateway.store import TokenRecord, TokenStore
from gateway.store.backends import open_store

RELOAD_SLACK_S = 5  # a gateway reloads the keyring within a second; tokens it signs meanwhile use the old key


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="list, rotate and retire signing keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    listing = add_json(add_config(actions.add_parser(
        "list", help="list keys and the live tokens each still verifies (never private material)")))
    listing.set_defaults(handler=list_keys)
    rotate = add_json(add_config(actions.add_parser("rotate", help="new active key; the old one keeps verifying")))
    rotate.set_defaults(handler=rotate_keys)
    retire = add_json(add_config(actions.add_parser(
        "retire", help="stop accepting tokens signed with KID (refused while it verifies live tokens)")))
    retire.add_argument("kid")
    retire.add_argument("--force", action="store_true",
                        help="retire it even though live tokens signed with it will then be refused")
    retire.set_defaults(handler=retire_key)


def signed_by(keyring: Keyring, key: SigningKey, records: list[TokenRecord], now: int) -> list[TokenRecord]:
    """The live tokens (not revoked, not expired) `key` signed, by their issue time."""
    index = next(i for i, k in enumerate(keyring.keys) if k.kid == key.kid)
    later = keyring.keys[index + 1:]
    end = None if key.status == "active" or not later else later[0].created_at + RELOAD_SLACK_S
    return sorted((r for r in records if r.revoked_at is None and r.exp > now and r.iat >= key.created_at
                   and (end is None or r.iat < end)), key=lambda r: r.exp)


def _time(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _rows(keyring: Keyring, store: TokenStore) -> list[dict[str, Any]]:
    try:
        records: list[TokenRecord] | None = await store.records(include_revoked=False)
    except StateUnavailable as exc:  # the keys are still worth seeing; the counts are unknown
        print(f"scopegate: warning: live token counts unknown: {exc.message}", file=sys.stderr)
        records = None
    now, rows = int(time.time()), []
    for key in keyring.keys:
        counted = records is not None and key.status != "retired"
        live = signed_by(keyring, key, records, now) if counted and records is not None else []
        rows.append({"kid": key.kid, "status": key.status, "created_at": key.created_at, "alg": "EdDSA",
                     "live_tokens": len(live) if counted else None,
                     "verifies_until": _time(live[-1].exp) if live else None})
    return rows


async def _show(args: argparse.Namespace, keyring: Keyring, store: TokenStore) -> None:
    rows = await _rows(keyring, store)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ("kid", "status", "alg", "created_at", "live_tokens", "verifies_until"))


async def list_keys(args: argparse.Namespace) -> int:
    config = config_from(args)
    keyring = Keyring.load(config.tokens_keyring)
    store = open_store(config)
    try:
        await _show(args, keyring, store)
    finally:
        await store.close()
    return 0


async def rotate_keys(args: argparse.Namespace) -> int:
    config = config_from(args)
    keyring = Keyring.load(config.tokens_keyring)
    store = open_store(config)
    audit = LocalAudit.open(config, store)
    try:
        async with audit.action("gateway:rotate-key", "keys rotate") as record:
            fresh = new_key()
            keys = [dataclasses.replace(k, status="verify") if k.status == "active" else k for k in keyring.keys]
            rotated = Keyring([*keys, fresh], keyring.path)
            rotated.save()
            record.reason, record.status = f"new active key {fresh.kid}; {keyring.active.kid} now only verifies", 200
        old = next(k for k in rotated.keys if k.kid == keyring.active.kid)
        live = signed_by(rotated, old, await store.records(include_revoked=False), int(time.time()))
        print(f"new active key {fresh.kid}; {old.kid} now only verifies"
              + (f": it keeps verifying its {len(live)} live tokens until the last expires ({_time(live[-1].exp)});"
                 f" retire it after that with `scopegate keys retire {old.kid}`" if live
                 else f" and no live token needs it: `scopegate keys retire {old.kid}` when every gateway has "
                      "reloaded the keyring"), file=sys.stderr)
        await _show(args, rotated, store)
    finally:
        await audit.close()
        await store.close()
    return 0


async def retire_key(args: argparse.Namespace) -> int:
    config = config_from(args)
    keyring = Keyring.load(config.tokens_keyring)
    store = open_store(config)
    audit = LocalAudit.open(config, store)
    try:
        async with audit.action("gateway:retire-key", "keys retire") as record:
            retired = await _retire(args, keyring, store)
            record.reason, record.status = retired, 200
        print(retired, file=sys.stderr)
        await _show(args, Keyring.load(config.tokens_keyring), store)
    finally:
        await audit.close()
        await store.close()
    return 0


async def _retire(args: argparse.Namespace, keyring: Keyring, store: TokenStore) -> str:
    """Retire the key (or refuse); returns what was done, as the audit record and stderr say it."""
    target = next((k for k in keyring.keys if k.kid == args.kid), None)
    if target is None:
        raise NotFound(f"no key {args.kid!r} in {keyring.path}; `scopegate keys list` shows them")
    if target.status == "active":
        raise ConfigError(f"key {args.kid} is the active signing key; run `scopegate keys rotate` first, then "
                          "retire it once the tokens it signed have expired (`scopegate keys list` shows when)")
    if target.status == "retired":
        return f"key {args.kid} was already retired; nothing changed"
    live = signed_by(keyring, target, await store.records(include_revoked=False), int(time.time()))
    if live and not args.force:
        named = ", ".join(f"{r.name} ({r.jti})" for r in live[:5]) + (f" and {len(live) - 5} more"
                                                                         if len(live) > 5 else "")
        raise Forbidden(
            f"key {args.kid} still verifies {len(live)} live token{'s' if len(live) != 1 else ''} ({named}); "
            f"retiring it now makes each of them fail with 401. Wait until the last expires ({_time(live[-1].exp)}), "
            "or move them to the active key first (`scopegate token rotate JTI --grace 0s` and hand out the new "
            "token, or revoke them), or pass --force to retire it anyway")
    keys = [dataclasses.replace(k, status="retired") if k.kid == args.kid else k for k in keyring.keys]
    Keyring(keys, keyring.path).save()
    broken = f"; {len(live)} live tokens signed with it are now refused (--force)" if live else ""
    return f"key {args.kid} retired: tokens signed with it are refused{broken}"
