"""Reading audit records back: the filters of `scopegate audit tail|export` and of
`GET /_gateway/v1/audit`, applied the same way to a file sink's lines and to the records a gateway
keeps in memory.

A query selects records by time (`since`: an RFC 3339 time or a duration ago), app (a glob, as
grants write them), decision (`allow`/`deny`) and token (its `jti` or its name), and keeps the
newest `limit` of those, oldest first.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from gateway.durations import parse_duration

MAX_LIMIT = 10_000
DECISIONS = ("allow", "deny")


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds from `1h` (that long ago) or an RFC 3339 time with a zone; ValueError naming it."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither an RFC 3339 time (2026-11-26T10:00:00Z) nor a duration like 1h") \
            from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} needs a time zone (e.g. a trailing Z)")
    return moment.timestamp()


def record_time(record: dict[str, Any]) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(record.get("ts")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class AuditQuery:
    since: float | None = None
    app: str | None = None
    decision: str | None = None
    token: str | None = None
    limit: int | None = None  # None: every record that matches

    def __post_init__(self) -> None:
        if self.decision is not None and self.decision not in DECISIONS:
            raise ValueError(f"decision {self.decision!r} is neither allow nor deny")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit {self.limit} is out of range: give 1 or more")

    def matches(self, record: dict[str, Any]) -> bool:
        if self.decision is not None and record.get("decision") != self.decision:
            return False
        if self.app is not None and not fnmatchcase(str(record.get("app") or ""), self.app):
            return False
        if self.token is not None and self.token not in (record.get("jti"), record.get("token_name")):
            return False
        if self.since is not None:
            stamp = record_time(record)
            if stamp is None or stamp < self.since:
                return False
        return True

    def select(self, lines: Iterable[str]) -> list[str]:
        """The lines (JSON records, each with its newline) that match, the newest `limit`, in order."""
        kept: deque[str] = deque(maxlen=self.limit)
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash is not a record
            if isinstance(record, dict) and self.matches(record):
                kept.append(line if line.endswith("\n") else line + "\n")
        return list(kept)
