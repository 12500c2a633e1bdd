"""Printing for people (Rich tables) and for scripts (`--json`, stable keys)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

RECORD_COLUMNS = ("jti", "sub", "name", "grants", "iat", "exp", "parent", "rotated_from", "revoked_at",
                  "last_used_at")
_TIMES = {"iat", "exp", "revoked_at", "last_used_at", "created_at"}


def console() -> Console:
    # Wide enough off a terminal that jtis and grants are never cut.
    return Console(width=None if sys.stdout.isatty() else 240, highlight=False, soft_wrap=False)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")


def cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in _TIMES and isinstance(value, int):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "-"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: tuple[str, ...], *, title: str | None = None) -> None:
    table = Table(title=title, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.upper(), overflow="fold")
    for row in rows:
        table.add_row(*(cell(c, row.get(c)) for c in columns))
    console().print(table)


def print_mapping(row: dict[str, Any], keys: tuple[str, ...]) -> None:
    table = Table(show_header=False, show_edge=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key in keys:
        table.add_row(key, cell(key, row.get(key)))
    if row.get("revoked_reason"):
        table.add_row("reason", str(row["revoked_reason"]))
    console().print(table)
