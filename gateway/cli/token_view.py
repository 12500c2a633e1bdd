"""How `token list|show` print records, and how `show|revoke|rotate` find the token meant.

The default listing fits 80 columns (NAME, ID prefix, GRANTS cut with `…`, EXPIRES relative,
STATE); `-o wide` prints every field uncut, `-o json|yaml` the records, `--field F` one field's
raw value per record (for scripts). A token is named by its jti, a unique jti prefix (4
characters or more, as `token list` shows 8) or its name; a name several tokens share picks the
one that is still active when exactly one is, and anything still ambiguous is a usage error that
lists the candidates.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import yaml

from gateway.cli.common import UsageError
from gateway.cli.output import RECORD_COLUMNS, cell, print_json, print_mapping
from gateway.errors import NotFound

Json = dict[str, Any]
FIELDS = (*RECORD_COLUMNS, "revoked_reason", "state")
OUTPUTS = ("table", "wide", "json", "yaml")
STATES_HELP = ("active (usable; listings show a token replaced by rotation as rotated and its successor as "
               "renewed), revoked, or expired (past exp, or rotated away after its grace)")
MIN_PREFIX = 4
ID_WIDTH = 8
# name, id, grants, expires, state: 20 + 8 + 28 + 9 + 7 and four 2-space gaps = 80 columns.
NARROW = (("name", 20), ("id", ID_WIDTH), ("grants", 28), ("expires", 9), ("state", 7))


def add_output(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`-o table|wide|json|yaml`, `--json` (same as -o json) and `--field F`."""
    parser.add_argument("-o", "--output", choices=OUTPUTS, default=None,
                        help="table (default, fits 80 columns), wide (every field, uncut), json or yaml")
    parser.add_argument("--json", action="store_true", help="same as -o json")
    parser.add_argument("--field", metavar="F",
                        help=f"print only this field's raw value, for scripts ({', '.join(FIELDS)}; lists "
                             "space-separated, times in Unix seconds, none empty)")
    return parser


def output_of(args: argparse.Namespace) -> str:
    if args.json and args.output not in (None, "json"):
        raise UsageError(f"--json and -o {args.output} disagree; give one of them")
    if args.field is not None:
        if args.output is not None or args.json:
            raise UsageError("--field prints one raw value; it does not combine with -o or --json")
        if args.field not in FIELDS:
            raise UsageError(f"--field {args.field!r} is not a field; fields: {', '.join(FIELDS)}")
        return "field"
    return "json" if args.json else args.output or "table"


def state(record: Json, now: int) -> str:
    if record.get("revoked_at") is not None:
        return "revoked"
    return "expired" if int(record["exp"]) <= now else "active"


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def relative(when: int, now: int) -> str:
    """`in 29d`, `in 1h59m`, `3m ago`: the largest whole unit, and the next one below 10 of it."""
    delta = when - now
    size = abs(delta)
    amount = "0s"
    for index, (unit, seconds) in enumerate(_UNITS):
        if size >= seconds:
            amount = f"{size // seconds}{unit}"
            if size // seconds < 10 and index + 1 < len(_UNITS):
                below, below_seconds = _UNITS[index + 1]
                rest = size % seconds // below_seconds
                amount += f"{rest}{below}" if rest else ""
            break
    return f"in {amount}" if delta > 0 else f"{amount} ago"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def raw(record: Json, field: str, now: int) -> str:
    value = state(record, now) if field == "state" else record.get(field)
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def shown_state(record: Json, now: int, replaced: set[str]) -> str:
    """The state as a listing shows it: an active token replaced by rotation (alive for its grace)
    is `rotated`, its active successor `renewed`; both are usable, so `--state active` takes them."""
    current = state(record, now)
    if current == "active" and record["jti"] in replaced:
        return "rotated"
    if current == "active" and record.get("rotated_from"):
        return "renewed"
    return current


def _narrow_row(record: Json, now: int, replaced: set[str]) -> dict[str, str]:
    return {"name": str(record["name"]), "id": str(record["jti"])[:ID_WIDTH], "grants": ",".join(record["grants"]),
            "expires": relative(int(record["exp"]), now), "state": shown_state(record, now, replaced)}


def _print_columns(rows: list[dict[str, str]], columns: tuple[tuple[str, int | None], ...]) -> None:
    cut = [{key: _cut(row[key], width) if width else row[key] for key, width in columns} for row in rows]
    widths = {key: max([len(key), *(len(row[key]) for row in cut)]) for key, _ in columns}
    lines = [[key.upper() for key, _ in columns], *([row[key] for key, _ in columns] for row in cut)]
    for line in lines:
        sys.stdout.write("  ".join(text.ljust(widths[key]) for text, (key, _) in zip(line, columns,
                                                                                     strict=True)).rstrip() + "\n")


def print_records(args: argparse.Namespace, records: list[Json]) -> None:
    how, now = output_of(args), int(time.time())
    replaced = {str(r["rotated_from"]) for r in records if r.get("rotated_from")}
    if how == "json":
        print_json(records)
    elif how == "yaml":
        sys.stdout.write(yaml.safe_dump(records, sort_keys=True) if records else "[]\n")
    elif how == "field":
        for record in records:
            sys.stdout.write(raw(record, args.field, now) + "\n")
    elif not records:
        print("no tokens", file=sys.stderr)
    elif how == "wide":
        columns = (*RECORD_COLUMNS, "state")
        rows = [{**{c: cell(c, r.get(c)) for c in RECORD_COLUMNS}, "state": shown_state(r, now, replaced)}
                for r in records]
        _print_columns(rows, tuple((c, None) for c in columns))
    else:
        _print_columns([_narrow_row(r, now, replaced) for r in records], NARROW)


def print_record(args: argparse.Namespace, record: Json) -> None:
    how, now = output_of(args), int(time.time())
    if how == "json":
        print_json(record)
    elif how == "yaml":
        sys.stdout.write(yaml.safe_dump(record, sort_keys=True))
    elif how == "field":
        sys.stdout.write(raw(record, args.field, now) + "\n")
    else:
        print_mapping({**record, "state": state(record, now)}, (*RECORD_COLUMNS, "state"))


def resolve(ref: str, records: list[Json]) -> Json:
    """The one record `ref` names: its jti, a unique jti prefix, or its name."""
    exact = [r for r in records if r["jti"] == ref]
    if exact:
        return exact[0]
    now = int(time.time())
    by_name = [r for r in records if r["name"] == ref]
    by_prefix = [r for r in records if len(ref) >= MIN_PREFIX and str(r["jti"]).startswith(ref)]
    candidates = list({r["jti"]: r for r in [*by_name, *by_prefix]}.values())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        hint = f" (a jti prefix needs {MIN_PREFIX} characters or more)" if len(ref) < MIN_PREFIX else ""
        raise NotFound(f"no token with jti, jti prefix or name {ref!r}{hint}; `scopegate token list` shows them")
    live = [r for r in by_name if state(r, now) == "active"]
    if not by_prefix and len(live) == 1:
        return live[0]  # a rotated token's name lives on in its replacement: that one is meant
    listed = "\n".join(f"  {r['jti']}  {r['name']}  {state(r, now)}  {','.join(r['grants'])}"
                       for r in sorted(candidates, key=lambda r: (state(r, now) != "active", -int(r["iat"]))))
    raise UsageError(f"{ref!r} names {len(candidates)} tokens; give the jti of the one you mean:\n{listed}")
