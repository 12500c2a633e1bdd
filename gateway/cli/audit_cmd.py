"""`scopegate audit tail [--follow] | export --since TIME`: read the file audit sink."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from gateway.cli.common import add_config, config_from
from gateway.durations import parse_duration
from gateway.errors import ConfigError


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="read audit records from the file sink")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    tail = add_config(actions.add_parser("tail", help="print the last records (JSON lines)"))
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many (default 20)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument("--file", help="audit file (default: the config's first file: sink)")
    tail.set_defaults(handler=tail_audit)
    export = add_config(actions.add_parser("export", help="print records since a time (JSON lines)"))
    export.add_argument("--since", required=True, help="RFC 3339 time (2026-11-26T10:00:00Z) or a duration ago (1h)")
    export.add_argument("--file", help="audit file (default: the config's first file: sink)")
    export.set_defaults(handler=export_audit)


def audit_file(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file)
    config = config_from(args)
    for sink in config.audit_sinks:
        if sink.startswith("file:"):
            path = Path(sink[5:]).expanduser()
            return path if path.is_absolute() else config.base_dir / path
    raise ConfigError("no file: sink in audit.sinks; add one (e.g. file:audit.jsonl) or pass --file")


def parse_since(text: str, now: float | None = None) -> float:
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since {text!r} is neither an RFC 3339 time nor a duration like 1h") from None
    if moment.tzinfo is None:
        raise ConfigError(f"--since {text!r} needs a time zone (e.g. a trailing Z)")
    return moment.timestamp()


def record_time(line: str) -> float | None:
    try:
        stamp = json.loads(line).get("ts")
        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def _open(path: Path) -> Any:
    try:
        return path.open(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"audit file {path} does not exist (yet); is the gateway writing to it?") from None


def tail_audit(args: argparse.Namespace) -> int:
    path = audit_file(args)
    with _open(path) as handle:
        lines = handle.readlines()
        for line in lines[-args.lines:] if args.lines > 0 else []:
            sys.stdout.write(line)
        sys.stdout.flush()
        while args.follow:
            line = handle.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0


def export_audit(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    with _open(audit_file(args)) as handle:
        for line in handle:
            stamp = record_time(line)
            if stamp is not None and stamp >= since:
                sys.stdout.write(line)
    return 0
