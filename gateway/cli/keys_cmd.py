"""`scopegate keys list|rotate|retire KID`: the signing keyring, edited in place.

A running gateway watches the keyring file and picks changes up within a second: after
`rotate` new tokens are signed with the new key while older keys keep verifying until their
tokens expire; `retire` stops a key from verifying anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from gateway.cli.common import add_config, add_json, config_from
from gateway.cli.output import print_json, print_table
from gateway.core.keyring import Keyring, new_key
from gateway.errors import ConfigError, NotFound


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="list, rotate and retire signing keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    listing = add_json(add_config(actions.add_parser("list", help="list keys (never private material)")))
    listing.set_defaults(handler=list_keys)
    rotate = add_json(add_config(actions.add_parser("rotate", help="new active key; the old one keeps verifying")))
    rotate.set_defaults(handler=rotate_keys)
    retire = add_json(add_config(actions.add_parser("retire", help="stop accepting tokens signed with KID")))
    retire.add_argument("kid")
    retire.set_defaults(handler=retire_key)


def _rows(keyring: Keyring) -> list[dict[str, Any]]:
    return [{"kid": k.kid, "status": k.status, "created_at": k.created_at, "alg": "EdDSA"} for k in keyring.keys]


def _show(args: argparse.Namespace, keyring: Keyring) -> None:
    if args.json:
        print_json(_rows(keyring))
    else:
        print_table(_rows(keyring), ("kid", "status", "alg", "created_at"))


def list_keys(args: argparse.Namespace) -> int:
    _show(args, Keyring.load(config_from(args).tokens_keyring))
    return 0


def rotate_keys(args: argparse.Namespace) -> int:
    keyring = Keyring.load(config_from(args).tokens_keyring)
    fresh = new_key()
    keys = [dataclasses.replace(k, status="verify") if k.status == "active" else k for k in keyring.keys]
    rotated = Keyring([*keys, fresh], keyring.path)
    rotated.save()
    print(f"new active key {fresh.kid}; {keyring.active.kid} now only verifies", file=sys.stderr)
    _show(args, rotated)
    return 0


def retire_key(args: argparse.Namespace) -> int:
    keyring = Keyring.load(config_from(args).tokens_keyring)
    target = next((k for k in keyring.keys if k.kid == args.kid), None)
    if target is None:
        raise NotFound(f"no key {args.kid!r} in {keyring.path}; `scopegate keys list` shows them")
    if target.status == "active":
        raise ConfigError(f"key {args.kid} is the active signing key; run `scopegate keys rotate` first")
    keys = [dataclasses.replace(k, status="retired") if k.kid == args.kid else k for k in keyring.keys]
    retired = Keyring(keys, keyring.path)
    retired.save()
    print(f"key {args.kid} retired: tokens signed with it are refused", file=sys.stderr)
    _show(args, retired)
    return 0
