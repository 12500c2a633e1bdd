"""Audit records: one JSON object per line for every request and admin operation.

Records are built from names, never from token strings or the upstream credential: the only
token identifiers that appear are `jti`, `sub` and `token_name`. Sinks: `stdout`,
`file:PATH` (JSON lines, appended) and `redis` (a stream in the store's Redis shared by every
instance, shipped in the background).

Records are written in batches: `emit` encodes the record and queues the line; the lines queued
during one pass of the event loop go out in one write (and one flush) per sink, at the start of
the loop's next pass, so under load one system call carries many records instead of one each.
The record of a request is emitted after its answer has been sent, as before; a crash loses at
most the records of the last loop pass. Without a running loop (a command-line process) a
record is written at once. `flush` writes what is queued now; `close` flushes first.
A sink that fails to write is reported on stderr once and does not stop the request: the
decision has been taken, and denying traffic because a disk filled up is an outage, not safety.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from gateway.errors import ConfigError, redact

if TYPE_CHECKING:
    from redis.asyncio import Redis

FIELDS = ("ts", "request_id", "jti", "sub", "token_name", "client_ip", "method", "path", "action", "app",
          "env", "decision", "reason", "status", "duration_ms", "upstream_ms")


def new_record(request_id: str, *, client_ip: str, method: str, path: str,
               action: str | None = None) -> dict[str, Any]:
    """The record of a request before anything is known about it: a denial until proven otherwise."""
    return {"request_id": request_id, "jti": None, "sub": None, "token_name": None, "client_ip": client_ip,
            "method": method, "path": path, "action": action, "app": None, "env": None, "decision": "deny",
            "reason": None, "status": 500, "upstream_ms": None}


def fragment(**fields: Any) -> str:
    """Fields encoded once, as they appear inside a record line (`"k":v,...`), tokens redacted:
    for `AuditLog.emit_allowed`, which writes the parts of a record that repeat from request to
    request (who the token is; what the request is and why it is allowed) without encoding them
    again."""
    return _encode_redacted(fields)[1:-1]


def _encode_redacted(fields: dict[str, Any]) -> str:
    """JSON of `fields`; a token sent where a name belongs (path, body field) is kept out of it."""
    text = _encode(fields)
    if "sgt_" in text:
        text = _encode({k: redact(v) if isinstance(v, str) else v for k, v in fields.items()})
    return text


class Sink(Protocol):
    def write(self, lines: list[str]) -> None:
        """Write whole lines (each ends with a newline), in order."""

    def close(self) -> None: ...


class StreamSink:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(lines))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class FileSink:
    """Appends to the file with one unbuffered write per batch (O_APPEND: lines from several
    processes writing the same file never interleave within a write)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = path.open("ab", buffering=0)

    def write(self, lines: list[str]) -> None:
        data = memoryview("".join(lines).encode("utf-8"))
        while data:
            written = self.handle.write(data)
            if not written:
                raise OSError(f"audit file {self.path}: a write made no progress")
            data = data[written:]

    def close(self) -> None:
        self.handle.close()


class RedisSink:
    """The `redis` sink: records appended to a stream every instance shares (`XADD KEY MAXLEN ~ N *
    record LINE`, read with XRANGE/XREAD). `write` never waits for Redis: lines go to a bounded
    queue that a task on the running loop ships in pipelined batches. While Redis is down the
    queue keeps the newest `queue_limit` lines and retries each second; older ones are dropped
    and counted (reported on stderr once per outage)."""

    def __init__(self, client: Redis, key: str, maxlen: int, *, queue_limit: int = 10_000,
                 timeout_s: float = 1.0) -> None:
        self.client = client
        self.key = key
        self.maxlen = maxlen
        self.queue_limit = queue_limit
        self.timeout_s = timeout_s
        self.dropped = 0
        self._queue: deque[str] = deque()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def write(self, lines: list[str]) -> None:
        for line in lines:
            if len(self._queue) >= self.queue_limit:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(line)
        if self._task is None or self._task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: shipped by `drain`
                self._task = asyncio.get_running_loop().create_task(self._ship())

    async def _ship(self) -> None:
        from redis.exceptions import RedisError

        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 500))]
            try:
                async with asyncio.timeout(self.timeout_s):
                    pipe = self.client.pipeline(transaction=False)
                    for line in batch:
                        pipe.xadd(self.key, {"record": line.rstrip("\n")}, maxlen=self.maxlen, approximate=True)
                    await pipe.execute()
                self._failing = False
            except (RedisError, OSError, TimeoutError) as exc:
                room = max(self.queue_limit - len(self._queue), 0)
                self.dropped += max(len(batch) - room, 0)
                self._queue.extendleft(reversed(batch[len(batch) - room:]))  # the newest that fit
                if not self._failing:
                    self._failing = True
                    print(f"scopegate: audit sink redis failed ({exc.__class__.__name__}); records are kept "
                          f"in memory (up to {self.queue_limit}) and retried", file=sys.stderr)
                await asyncio.sleep(1.0)

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Ship what is queued (at most `timeout_s`), e.g. before the store's connection closes."""
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._ship())
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            self.close()

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


class AuditLog:
    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)
        self._failed: set[int] = set()
        self._pending: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None
        # `flush` may be called from another thread (a test reading the file, a shutdown hook)
        # while the loop's own flush runs: one writer at a time keeps the lines whole and in order.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, specs: Iterable[str], base_dir: Path, *,
                    redis_sink: Callable[[], Sink] | None = None) -> AuditLog:
        specs = list(specs)
        if "redis" in specs and redis_sink is None:
            raise ConfigError("audit.sinks: the redis sink writes to the Redis of store.url, which is not "
                              "a redis:// store; use stdout or file:PATH, or move the store to Redis")
        sinks: list[Sink] = []
        for spec in specs:
            if spec == "stdout":
                sinks.append(StreamSink(sys.stdout))
            elif spec.startswith("file:"):
                raw = Path(spec[5:]).expanduser()
                sinks.append(FileSink(raw if raw.is_absolute() else base_dir / raw))
            elif spec == "redis" and redis_sink is not None:
                sinks.append(redis_sink())
        return cls(sinks)

    async def drain(self) -> None:
        """Write what is queued, and let sinks that ship in the background (redis) finish."""
        self.flush()
        for sink in self.sinks:
            if isinstance(sink, RedisSink):
                await sink.drain()

    def emit(self, record: dict[str, Any]) -> None:
        if not self.sinks:
            return
        record.setdefault("ts", _now_rfc3339())
        self._queue(_encode_redacted(record) + "\n")

    def emit_allowed(self, request_id: str, who: str, client_ip: str, what: str, status: int,
                     upstream_ms: float | None, duration_ms: float) -> None:
        """The record `emit` would write for a forwarded request, from `fragment`s built once
        (`who`: jti, sub, token_name; `what`: method, path, action, app, env, decision, reason):
        the same fields in the same order, without encoding the repeating parts per request."""
        if not self.sinks:
            return
        upstream = "null" if upstream_ms is None else repr(upstream_ms)
        if "sgt_" in client_ip:  # as `emit` would: no token in any field
            client_ip = redact(client_ip)
        self._queue(f'{{"request_id":{_quote(request_id)},{who},"client_ip":{_quote(client_ip)},{what},'
                    f'"status":{status:d},"upstream_ms":{upstream},"duration_ms":{duration_ms!r},'
                    f'"ts":"{_now_rfc3339()}"}}\n')

    def _queue(self, line: str) -> None:
        """Queue one whole line (ending with a newline) for the next write."""
        # No lock here: list.append is atomic, and `flush` takes lines off the front of this same
        # list, so a line appended while another thread flushes is kept for the next write.
        self._pending.append(line)
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
