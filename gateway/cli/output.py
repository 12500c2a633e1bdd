"""Printing records for people (aligned tables) and scripts (`--json`)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from gateway.store import TokenRecord

COLUMNS = ("jti", "sub", "name", "grants", "iat", "exp", "parent", "revoked_at", "last_used_at")


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _when(value: int | None) -> str:
    return "-" if value is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))


def record_row(record: TokenRecord) -> dict[str, str]:
    return {
        "jti": record.jti, "sub": record.sub, "name": record.name, "grants": " ".join(record.grants),
        "iat": _when(record.iat), "exp": _when(record.exp), "parent": record.parent or "-",
        "revoked_at": _when(record.revoked_at), "last_used_at": _when(record.last_used_at),
    }


def print_table(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> None:
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    sys.stdout.write("\n".join(line.rstrip() for line in lines) + "\n")


def print_record(record: TokenRecord) -> None:
    row = record_row(record)
    width = max(len(k) for k in row)
    for key, value in row.items():
        sys.stdout.write(f"{key.ljust(width)}  {value}\n")
    if record.revoked_reason:
        sys.stdout.write(f"{'reason'.ljust(width)}  {record.revoked_reason}\n")
