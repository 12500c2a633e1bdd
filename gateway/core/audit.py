"""Audit records: one JSON object per line for every request and admin operation (DESIGN section 12).

`AuditRecord` is the one shape every record has, whoever fills it (a surface, the admin API, the
token exchange); `encode` is the one encoder. Records are built from names, never from token
strings or the upstream credential: the only token identifiers that appear are `jti`, `sub` and
`token_name`, and any `sgt_...` text that arrives where a name belongs is redacted.

A line is three kinds of parts: who the token is (`jti`, `sub`, `token_name`), what the request is
and how it was decided (`method` ... `reason`), and what happened to this one request (ids,
status, timings). The first two repeat from request to request of the same token and request
line, so the decision cache (decision_cache.py) keeps them encoded (`who_part`, `what_part`) and
hands them back in `AuditRecord.who`/`what`; `encode` uses them when present and builds them the
same way when not, so a cached request's line is the line a first request gets
(tests/test_audit.py checks both paths against each other).

Lines are written in batches: `emit` encodes and queues; the lines queued during one pass of the
event loop go out in one write per sink at the start of the next pass. Without a running loop (a
command-line process) a line is written at once. A sink that fails is reported on stderr once and
does not stop the request: the decision has been taken, and denying traffic because a disk filled
up is an outage, not safety.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from gateway.core.audit_sinks import FileSink, Sink
from gateway.errors import redact

FIELDS = ("request_id", "jti", "sub", "token_name", "client_ip", "method", "path", "action", "app", "env",
          "decision", "reason", "status", "upstream_ms", "duration_ms", "ts")


@dataclass(slots=True, eq=False)
class AuditRecord:
    """What one request or admin operation did: a denial with status 500 until proven otherwise."""

    request_id: str
    client_ip: str
    method: str
    path: str
    action: str | None = None
    jti: str | None = None
    sub: str | None = None
    token_name: str | None = None
    app: str | None = None
    env: str | None = None
    decision: str = "deny"
    reason: str | None = None
    status: int = 500
    upstream_ms: float | None = None
    duration_ms: float | None = None
    extra: dict[str, Any] | None = None  # endpoint-specific fields (the exchange's issuer, rule, claims)
    # The repeating parts already encoded (from the decision cache): valid only while the fields
    # they encode are unchanged, so anything that changes those fields drops them.
    who: str | None = None
    what: str | None = None

    def deny(self, status: int, reason: str) -> None:
        self.decision, self.status, self.reason, self.what = "deny", status, reason, None


def who_part(record: AuditRecord) -> str:
    return _fragment({"jti": record.jti, "sub": record.sub, "token_name": record.token_name})


def what_part(record: AuditRecord) -> str:
    return _fragment({"method": record.method, "path": record.path, "action": record.action, "app": record.app,
                      "env": record.env, "decision": record.decision, "reason": record.reason})


def encode(record: AuditRecord, ts: str) -> str:
    """The record's line (with its newline): the fields of FIELDS in that order, then `extra`."""
    who = record.who if record.who is not None else who_part(record)
    what = record.what if record.what is not None else what_part(record)
    client_ip = redact(record.client_ip) if "sgt_" in record.client_ip else record.client_ip
    upstream = "null" if record.upstream_ms is None else repr(record.upstream_ms)
    duration = "null" if record.duration_ms is None else repr(record.duration_ms)
    extra = "," + _fragment(record.extra) if record.extra else ""
    return (f'{{"request_id":{_quote(record.request_id)},{who},"client_ip":{_quote(client_ip)},{what},'
            f'"status":{record.status:d},"upstream_ms":{upstream},"duration_ms":{duration}{extra},"ts":"{ts}"}}\n')


def _fragment(fields: dict[str, Any]) -> str:
    """`"k":v,...` as inside a JSON object; a token sent where a name belongs is kept out of it."""
    text = _encode(fields)
    if "sgt_" in text:
        text = _encode({k: redact(v) if isinstance(v, str) else v for k, v in fields.items()})
    return text[1:-1]


RECENT = 10_000  # records a gateway keeps in memory for `GET /_gateway/v1/audit` (a few MB)


class AuditLog:
    def __init__(self, sinks: Iterable[Sink] = (), *, keep_recent: int = RECENT) -> None:
        self.keep_recent = keep_recent
        # The newest lines this process wrote: the admin API reads them back when no file sink is
        # configured (a stdout-only gateway cannot read its own stdout). With a file sink the API
        # reads the file, and nothing is kept here.
        self.recent: deque[str] = deque(maxlen=0)
        self.open(sinks)
        self._failed: set[int] = set()
        self._pending: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None
        # `flush` may be called from another thread (a test reading the file, a shutdown hook)
        # while the loop's own flush runs: one writer at a time keeps the lines whole and in order.
        self._lock = threading.Lock()

    def open(self, sinks: Iterable[Sink]) -> None:
        """Start writing to `sinks` (the composition root opens them last, once the rest is good)."""
        self.sinks = list(sinks)
        keep = 0 if any(isinstance(sink, FileSink) for sink in self.sinks) else self.keep_recent
        if keep != self.recent.maxlen:
            self.recent = deque(self.recent, maxlen=keep)

    async def drain(self) -> None:
        """Write what is queued, and let sinks that ship in the background (redis) finish."""
        self.flush()
        for sink in self.sinks:
            drain = getattr(sink, "drain", None)
            if drain is not None:
                await drain()

    def emit(self, record: AuditRecord) -> None:
        if self.sinks:
            self._queue(encode(record, _now_rfc3339()))

    def _queue(self, line: str) -> None:
        """Queue one whole line (ending with a newline) for the next write."""
        # No lock here: list.append is atomic, and `flush` takes lines off the front of this same
        # list, so a line appended while another thread flushes is kept for the next write.
        self._pending.append(line)
        self.recent.append(line)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # no loop to batch on: written at once
        if loop is None:
            self.flush()
        elif self._scheduled is not loop:
            self._scheduled = loop  # this loop's next pass writes what is queued by then
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued line now, one write per sink."""
        with self._lock:
            self._scheduled = None
            lines = self._pending[:]
            if not lines:
                return
            del self._pending[:len(lines)]
            for index, sink in enumerate(self.sinks):
                try:
                    sink.write(lines)
                except (OSError, ValueError) as exc:
                    if index not in self._failed:
                        self._failed.add(index)
                        print(f"scopegate: audit sink {index} failed: {exc.__class__.__name__}", file=sys.stderr)

    def recent_lines(self) -> list[str]:
        """A copy of the lines kept in memory, oldest first."""
        while True:
            try:
                return list(self.recent)
            except RuntimeError:  # appended to from another thread while copying: copy again
                continue

    def close(self) -> None:
        self.flush()
        for sink in self.sinks:
            sink.close()


def _now_rfc3339() -> str:
    global _last_ms, _last_second
    now_ms = int(time.time() * 1000)
    # Records come many to a millisecond under load, and the whole-second prefix changes once a
    # second: format each only when it changes. Each cache is one tuple, replaced in one
    # assignment, so a reader in another thread never pairs a time with another time's text.
    cached = _last_ms
    if cached[0] == now_ms:
        return cached[1]
    second, milli = divmod(now_ms, 1000)
    prefix = _last_second
    if prefix[0] != second:
        prefix = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    text = f"{prefix[1]}.{milli:03d}Z"
    _last_ms = (now_ms, text)
    return text


# One encoder for every record: json.dumps with arguments builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_last_ms: tuple[int, str] = (-1, "")
_last_second: tuple[int, str] = (-1, "")
