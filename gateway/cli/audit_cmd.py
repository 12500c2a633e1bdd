"""`scopegate audit tail [-n N] [--follow] | export --since TIME`, with filters.

Records are printed as they are stored: one JSON object per line (`--json` asks for exactly that,
for scripts that pass it to every command). Where they are read from:
- remote mode (SCOPEGATE_ADDR and SCOPEGATE_TOKEN set, no --file): the running gateway's
  `GET /_gateway/v1/audit` (its file sink, else the records it keeps in memory);
- otherwise the config's first `file:` sink (or --file). With no file sink there is nothing here
  to read: the message says where the lines go instead and how to add one.
Filters (`--app GLOB`, `--decision allow|deny`, `--token JTI|NAME`, `--since`) are the same both
ways (core/audit_query.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from gateway.cli.backend import remote_settings
from gateway.cli.common import add_config, config_from
from gateway.config import Config
from gateway.core.audit_query import DECISIONS, MAX_LIMIT, AuditQuery, parse_since
from gateway.core.audit_sinks import file_sink_path
from gateway.errors import ConfigError, Forbidden, NotFound, StateUnavailable, Unauthenticated

EXAMPLE_FILE = "/var/lib/scopegate/audit.jsonl"


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="read audit records (a file sink, or a running gateway's admin API)")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    tail = _common(actions.add_parser("tail", help="print the last records (JSON lines)"))
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many (default 20)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument("--since", help="only records since an RFC 3339 time or a duration ago (1h)")
    tail.set_defaults(handler=tail_audit)
    export = _common(actions.add_parser("export", help="print records since a time (JSON lines)"))
    export.add_argument("--since", required=True, help="RFC 3339 time (2026-11-26T10:00:00Z) or a duration ago (1h)")
    export.set_defaults(handler=export_audit)


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config(parser)
    parser.add_argument("--file", help="audit file (default: the config's first file: sink)")
    parser.add_argument("--json", action="store_true", help="JSON lines (what is printed anyway)")
    parser.add_argument("--app", help="only records of this app (a glob: 'web-*')")
    parser.add_argument("--decision", choices=DECISIONS, help="only allowed or only denied requests")
    parser.add_argument("--token", "--jti", dest="token", metavar="JTI_OR_NAME",
                        help="only records of this token (its jti or name)")
    return parser


def _query(args: argparse.Namespace, limit: int | None) -> AuditQuery:
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    return AuditQuery(since=since, app=args.app, decision=args.decision, token=args.token, limit=limit)


def audit_file(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file)
    config = config_from(args)
    path = file_sink_path(config.audit_sinks, config.base_dir)
    if path is None:
        raise NotFound(_no_file_sink(config))
    return path


def _no_file_sink(config: Config) -> str:
    sinks = ", ".join(config.audit_sinks) or "none"
    where = []
    if "stdout" in config.audit_sinks:
        where.append("to the gateway's standard output (read them where that goes: `docker logs CONTAINER`, "
                     "`journalctl -u scopegate`, your log collector)")
    if "redis" in config.audit_sinks:
        where.append(f"to the Redis stream {config.store_prefix}audit of store.url (XRANGE/XREAD)")
    return (f"audit.sinks ({config.source}) is [{sinks}]: no file here to read. The gateway writes its audit "
            f"records {' and '.join(where) or 'nowhere'}. To read them with this command, add a file sink "
            f"(audit.sinks: [stdout, \"file:{EXAMPLE_FILE}\"], or SCOPEGATE_AUDIT__SINKS='[\"stdout\", "
            f"\"file:{EXAMPLE_FILE}\"]'), pass --file PATH, or set SCOPEGATE_ADDR and SCOPEGATE_TOKEN to read a "
            "running gateway's recent records through its admin API")


def _open(path: Path) -> TextIO:
    try:
        return path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"audit file {path} does not exist (yet); is the gateway writing to it?") from None


def _write(lines: list[str]) -> None:
    sys.stdout.write("".join(lines))
    sys.stdout.flush()


def tail_audit(args: argparse.Namespace) -> int:
    if args.lines < 1:
        raise ConfigError(f"-n: {args.lines} is not a number of records; give 1 or more")
    remote = None if args.file else remote_settings()
    if remote is not None:
        return _remote(args, *remote, limit=min(args.lines, MAX_LIMIT), follow=args.follow)
    query = _query(args, args.lines)
    with _open(audit_file(args)) as handle:
        _write(query.select(handle))
        unlimited, partial = _query(args, None), ""
        while args.follow:
            line = handle.readline()
            if not line:
                time.sleep(0.2)
                continue
            partial += line  # a line still being written arrives in pieces
            if partial.endswith("\n"):
                _write(unlimited.select([partial]))
                partial = ""
    return 0


def export_audit(args: argparse.Namespace) -> int:
    remote = None if args.file else remote_settings()
    if remote is not None:
        return _remote(args, *remote, limit=MAX_LIMIT, follow=False)
    query = _query(args, None)
    with _open(audit_file(args)) as handle:
        _write(query.select(handle))
    return 0


def _remote(args: argparse.Namespace, addr: str, token: str, *, limit: int, follow: bool) -> int:
    _query(args, limit)  # the filters are checked here, before any request
    params = {k: v for k, v in (("since", args.since), ("app", args.app), ("decision", args.decision),
                                ("token", args.token), ("limit", str(limit))) if v}
    seen: set[str] = set()
    with httpx.Client(base_url=addr, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        while True:
            body = _fetch(client, addr, params)
            records = [r for r in body["records"] if r.get("request_id") not in seen]
            _write([json.dumps(r, separators=(",", ":"), ensure_ascii=True) + "\n" for r in records])
            if not follow:
                if len(body["records"]) >= limit and args.audit_command == "export":
                    print(f"scopegate: only the newest {limit} records came back; read the file sink for more",
                          file=sys.stderr)
                return 0
            if len(seen) > 100_000:
                seen.clear()
            seen.update(str(r.get("request_id")) for r in records)
            if records:
                params["since"] = str(records[-1].get("ts"))
            time.sleep(1.0)


def _fetch(client: httpx.Client, addr: str, params: dict[str, str]) -> dict[str, Any]:
    try:
        response = client.get("/_gateway/v1/audit", params=params)
    except httpx.HTTPError as exc:
        raise StateUnavailable(f"cannot reach the gateway at {addr} ({exc.__class__.__name__}); "
                               "check SCOPEGATE_ADDR") from None
    if response.status_code != 200:
        try:
            message = str(response.json().get("message", response.text))
        except ValueError:
            message = response.text or f"HTTP {response.status_code}"
        if response.status_code == 401:
            raise Unauthenticated(f"{message} (SCOPEGATE_TOKEN)")
        if response.status_code == 400:
            raise ConfigError(message)
        raise Forbidden(message) if response.status_code == 403 else StateUnavailable(message)
    result: dict[str, Any] = response.json()
    return result
