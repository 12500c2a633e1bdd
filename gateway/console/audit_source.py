"""Reading the audit trail back: the last lines, then new ones as they are written.

From the `redis` sink's stream when `audit.sinks` has it (every instance writes there), else from
the first `file:PATH` sink (one instance, or several on one file). `stdout` alone cannot be read
back: the console says so. This is the one function the console reads audit through; the admin
API's `GET /_gateway/v1/audit` can share it (both want "lines after a point, filtered").
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.services import Services

TAIL_BYTES = 2 * 1024 * 1024
POLL_S = 0.25


class AuditUnreadable(GatewayError):
    status = 409
    code = "audit_unreadable"


def source_of(services: Services) -> str:
    """`redis`, or `file:PATH` (resolved), that the console reads; raises when there is none."""
    config = services.config
    if "redis" in config.audit_sinks:
        return "redis"
    for spec in config.audit_sinks:
        if spec.startswith("file:"):
            raw = Path(spec[5:]).expanduser()
            return "file:" + str(raw if raw.is_absolute() else config.base_dir / raw)
    raise AuditUnreadable("the audit view reads the redis sink or a file:PATH sink, and audit.sinks has only "
                          f"{', '.join(config.audit_sinks) or 'none'}; add file:PATH (or redis with a Redis store)")


def _parse(line: str | bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def follow(services: Services, *, backlog: int, stop: asyncio.Event) -> AsyncIterator[list[dict[str, Any]]]:
    """Batches of audit records: first up to `backlog` of the newest, then each new batch, until `stop`."""
    source = source_of(services)
    if source == "redis":
        async for batch in _follow_redis(services, backlog, stop):
            yield batch
    else:
        async for batch in _follow_file(Path(source[5:]), backlog, stop):
            yield batch


async def _follow_file(path: Path, backlog: int, stop: asyncio.Event) -> AsyncIterator[list[dict[str, Any]]]:
    position = 0
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    if size:
        with path.open("rb") as handle:
            start = max(0, size - TAIL_BYTES)
            handle.seek(start)
            data = handle.read(size - start)
        lines = data.split(b"\n")
        if start:
            lines = lines[1:]  # the first may be cut
        complete = lines[:-1]  # the last is empty, or a line still being written
        position = size - len(lines[-1])
        records = [r for r in map(_parse, complete[-backlog:]) if r is not None]
        yield records
    else:
        yield []
    partial = b""
    while not stop.is_set():
        await asyncio.sleep(POLL_S)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            yield []
            continue
        if size < position:  # rotated or truncated: start over
            position, partial = 0, b""
        if size == position:
            yield []  # nothing new: the caller may look around (client gone, session ended)
            continue
        with path.open("rb") as handle:
            handle.seek(position)
            data = handle.read(min(size - position, TAIL_BYTES))
        position += len(data)
        *complete, partial = (partial + data).split(b"\n")
        yield [r for r in map(_parse, complete) if r is not None]


async def _follow_redis(services: Services, backlog: int, stop: asyncio.Event
                        ) -> AsyncIterator[list[dict[str, Any]]]:
    client: Any = getattr(services.store, "client", None)
    if client is None:
        raise AuditUnreadable("audit.sinks names redis but the store is not a Redis store")
    key = services.config.store_prefix + "audit"
    newest = await client.xrevrange(key, count=backlog)
    last = newest[0][0] if newest else "0-0"
    yield [r for r in (_parse(fields.get(b"record") or fields.get("record") or "")
                       for _, fields in reversed(newest)) if r is not None]
    while not stop.is_set():
        try:
            answer = await client.xread({key: last}, count=500, block=100)
        except (OSError, TimeoutError) as exc:  # redis' own errors derive from neither: they end the stream
            raise AuditUnreadable(f"reading the audit stream failed ({exc.__class__.__name__})") from None
        batch: list[dict[str, Any]] = []
        for _, entries in answer or []:
            if entries:
                last = entries[-1][0]
                records = [_parse(fields.get(b"record") or fields.get("record") or "") for _, fields in entries]
                batch.extend(r for r in records if r is not None)
        yield batch
