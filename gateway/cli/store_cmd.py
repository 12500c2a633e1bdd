"""`scopegate store migrate --from URL --to URL` and `scopegate store info`.

`migrate` copies every token record, revoked ones included, from one store to another (SQLite to
Redis when a team outgrows one machine; any direction works) through the TokenStore protocol
alone. It is idempotent and never makes a token more powerful: a record the target lacks is
copied as it is; one it has is only ever revoked (if the source revoked it) or cut shorter (if
the source's expiry is earlier) — never revived, never lengthened. Run it again after the last
writes to the old store (e.g. once more after switching the gateways over) to pick up stragglers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.cli.common import add_config, add_json, config_from
from gateway.cli.output import print_json
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.store import TokenStore
from gateway.store.backends import open_store


def register(sub: Any) -> None:
    store = sub.add_parser("store", help="move token records between stores; check the configured store")
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    migrate = add_json(add_config(actions.add_parser(
        "migrate", help="copy token records and revocations from one store to another (idempotent)")))
    migrate.add_argument("--from", dest="source", required=True, metavar="URL",
                         help="store to read, e.g. sqlite:///./.scopegate/state.db")
    migrate.add_argument("--to", dest="target", required=True, metavar="URL",
                         help="store to write, e.g. redis://10.0.0.5:6379/0 (store.prefix and store.timeout_ms "
                              "come from the config)")
    migrate.set_defaults(handler=migrate_store)
    info = add_json(add_config(actions.add_parser("info", help="the configured store: backend and record counts")))
    info.set_defaults(handler=store_info)


@dataclass
class MigrationReport:
    source: str
    target: str
    records: int = 0
    copied: int = 0
    updated: int = 0
    unchanged: int = 0
    revoked: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def migrate(source: TokenStore, target: TokenStore, report: MigrationReport) -> MigrationReport:
    for record in await source.records(include_revoked=True):
        report.records += 1
        existing = await target.get(record.jti)
        if existing is None:
            await target.put(record)
            report.copied += 1
        else:
            changed = False
            if record.revoked_at is not None and existing.revoked_at is None:
                await target.revoke(record.jti, reason=record.revoked_reason, at=record.revoked_at)
                changed = True
            if record.exp < existing.exp:
                await target.shorten(record.jti, exp=record.exp)
                changed = True
            if changed:
                report.updated += 1
            else:
                report.unchanged += 1
    report.revoked = sum(1 for r in await target.records() if r.revoked_at is not None)
    return report


def store_url_arg(url: str, flag: str) -> str:
    """A store URL given on the command line; a relative SQLite path is relative to the working
    directory (not the config's folder), and must exist on the --from side."""
    scheme = url.partition(":")[0]
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) <= len("sqlite:///"):
            raise ConfigError(f"{flag}: expected sqlite:///PATH (three slashes, then a path)")
        return "sqlite:///" + str(Path(url[len("sqlite:///"):]).expanduser().resolve())
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        return url
    raise ConfigError(f"{flag}: expected sqlite:///PATH or redis://HOST:PORT/DB (also rediss://, unix://, "
                      "redis+sentinel://)")


def _with_store(config: Config, url: str) -> Config:
    return dataclasses.replace(config, store_url=url)


def _shown(url: str) -> str:
    from gateway.store.redis import redact

    return redact(url)


async def migrate_store(args: argparse.Namespace) -> int:
    config = config_from(args)
    source_url = store_url_arg(args.source, "--from")
    target_url = store_url_arg(args.target, "--to")
    if source_url == target_url:
        raise ConfigError("--from and --to name the same store; nothing to migrate")
    if source_url.startswith("sqlite:") and not Path(source_url[len("sqlite:///"):]).is_file():
        raise ConfigError(f"--from: {source_url[len('sqlite:///'):]} does not exist")
    source = open_store(_with_store(config, source_url))
    try:
        target = open_store(_with_store(config, target_url))
        try:
            await source.ping()
            await target.ping()
            started = time.monotonic()
            report = await migrate(source, target, MigrationReport(_shown(source_url), _shown(target_url)))
        finally:
            await target.close()
    finally:
        await source.close()
    if args.json:
        print_json(report.to_json())
    else:
        print(f"migrated {report.records} token records from {report.source} to {report.target} in "
              f"{time.monotonic() - started:.1f}s: {report.copied} copied, {report.updated} updated, "
              f"{report.unchanged} already there; {report.revoked} revoked in the target")
    return 0


async def store_info(args: argparse.Namespace) -> int:
    config = config_from(args)
    if config.store_url.startswith("sqlite:") and not config.store_sqlite_path().is_file():
        # Opening it would create an empty store and report 0 records: not the store meant.
        raise ConfigError(f"no store at {config.store_sqlite_path()}: `scopegate init` creates one, or --config "
                          "(or SCOPEGATE_CONFIG) names the config of the store you mean")
    store = open_store(config)
    try:
        await store.ping()
        records = await store.records()
        cursor = await store.current_cursor()
    finally:
        await store.close()
    now = int(time.time())
    info = {
        "url": _shown(config.store_url),
        "prefix": config.store_prefix if not config.store_url.startswith("sqlite:") else None,
        "records": len(records),
        "active": sum(1 for r in records if r.revoked_at is None and r.exp > now),
        "revoked": sum(1 for r in records if r.revoked_at is not None),
        "cursor": cursor,
    }
    if args.json:
        print_json(info)
    else:
        for key, value in info.items():
            if value is not None:
                print(f"{key:8} {value}", file=sys.stdout)
    return 0
