"""HTTP plumbing every surface shares: the request target as received, the client's headers read
once, request bodies with limits and timeouts, and answers (relayed, JSON, errors) over ASGI."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import BadRequest, GatewayError, RequestTimeout, TooLarge, error_body
from gateway.surfaces.stalls import stalls
from gateway.upstream.client import UpstreamResponse

log = logging.getLogger("scopegate")

Scope = dict[str, Any]
BODY_IDLE_TIMEOUT_S = 5.0

# Request headers forwarded upstream, by allow-list (DESIGN section 6, SECURITY.md): each surface
# passes its own set to `UpstreamClient.build_headers`; everything else the client sends (its
# address, a region or instance to route to, a URL to re-target, cookies) stops at the gateway.
# Content negotiation and tracing, what every client sends (answers are relayed as they come, so
# Accept-Encoding is the client's to choose; where the gateway reads an answer it drops it).
CLIENT_HEADERS = frozenset({b"accept", b"accept-encoding", b"accept-language", b"content-type", b"user-agent",
                            b"traceparent", b"tracestate"})
# flyctl's own (tests/contract/flyctl_calls.md): it says whether it runs in CI or a terminal.
FLYCTL_HEADERS = CLIENT_HEADERS | {b"fly-client-ci", b"fly-client-interactive", b"fly-client-parent"}


def request_target(scope: Scope) -> tuple[bytes, bytes, bool]:
    """(raw path, raw query, whether the target had a '?') as received. The request line's own
    target when the server gives it (server.py), which keeps what uvicorn would drop (absolute
    form, a fragment after the query, a bare '?')."""
    extension = scope.get("extensions", {}).get("scopegate.request_target")
    if isinstance(extension, bytes):
        path, mark, query = extension.partition(b"?")
        return path, query, bool(mark)
    raw = scope.get("raw_path")
    path = raw if isinstance(raw, bytes) else scope["path"].encode("utf-8")
    query = scope.get("query_string", b"")
    return path, query, bool(query)


def is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """One Content-Type, application/json, UTF-8 if a charset is named: a body read as JSON must be
    JSON to the upstream too (a form type would let a form parser read other fields from it)."""
    types = [value for name, value in headers if name == b"content-type"]
    if len(types) != 1:
        return False
    media, _, params = types[0].partition(b";")
    if media.strip().lower() != b"application/json":
        return False
    for param in params.split(b";") if params.strip() else ():
        key, _, value = param.strip().partition(b"=")
        if key.strip().lower() != b"charset" or value.strip().strip(b'"').lower() not in (b"utf-8", b"utf8"):
            return False
    return True


def printable(raw: bytes) -> str:
    """A raw path fit for a log line: at most 512 bytes, anything but ASCII escaped."""
    return raw[:512].decode("ascii", errors="backslashreplace")


def client_ip(scope: Scope) -> str:
    return str((scope.get("client") or ("", 0))[0])


class RequestHeaders:
    """What the request path needs from the client's headers, in one pass over them."""

    __slots__ = ("authorization", "has_body", "lengths")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.authorization: list[bytes] = []
        self.lengths: list[bytes] = []  # Content-Length values
        hosts = 0
        chunked = False
        for name, value in headers:
            if name == b"authorization":
                self.authorization.append(value)
            elif name == b"host":
                hosts += 1
            elif name == b"content-length":
                self.lengths.append(value)
            elif name == b"transfer-encoding":
                chunked = True
        if hosts > 1:
            raise BadRequest("more than one Host header; send exactly one")
        self.has_body = chunked
        for value in self.lengths:
            if value != b"0":
                self.has_body = True

    def check_declared_length(self, limit: int) -> None:
        for value in self.lengths:
            if not value.isdigit():
                raise BadRequest("Content-Length is not a number")
            if int(value) > limit:
                raise TooLarge(f"request body is larger than limits.max_body_bytes ({limit} bytes)")


async def read_body(receive: Any, limit: int) -> bytes:
    """The client's whole body, at most `limit` bytes, cut off when it stalls for
    BODY_IDLE_TIMEOUT_S (stalls.py: one watchdog per loop instead of a timer per message)."""
    task = asyncio.current_task()
    if task is None:  # not in a task: nothing for the watchdog to cancel
        body = bytearray()
        async for chunk in BodyStream(receive, limit).chunks():
            body += chunk
        return bytes(body)
    loop = asyncio.get_running_loop()
    watch = stalls(loop)
    parts: list[bytes] = []
    seen = 0
    try:
        while True:
            watch.watch(task, loop.time() + BODY_IDLE_TIMEOUT_S)
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequest("the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                raise TooLarge(f"request body is larger than limits.max_body_bytes ({limit} bytes)")
            if chunk:
                parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)
    except asyncio.CancelledError:
        if watch.was_stalled(task):
            raise RequestTimeout(f"the request body stalled for {BODY_IDLE_TIMEOUT_S:g}s; send it promptly") from None
        raise
    finally:
        watch.reading.pop(task, None)
        watch.stalled.discard(task)


class BodyStream:
    """The client's body as it arrives, cut off (with `error` set) past `limit` bytes."""

    def __init__(self, receive: Any, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.error: GatewayError | None = None
        self.received = 0  # bytes passed on so far

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            try:
                async with asyncio.timeout(BODY_IDLE_TIMEOUT_S):  # no task per message, unlike wait_for
                    message = await self.receive()
            except TimeoutError:
                self.error = RequestTimeout(f"the request body stalled for {BODY_IDLE_TIMEOUT_S:g}s; send it promptly")
                raise self.error from None
            if message["type"] == "http.disconnect":
                self.error = BadRequest("the client disconnected before sending the whole body")
                raise self.error
            chunk = message.get("body", b"")
            seen += len(chunk)
            self.received = seen
            if seen > self.limit:
                self.error = TooLarge(f"request body is larger than limits.max_body_bytes ({self.limit} bytes)")
                raise self.error
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


async def relay(send: Any, response: UpstreamResponse, request_id: str) -> None:
    """The upstream's answer to the client as it arrives; the part that ends it says so, so that an
    answer that arrived whole leaves in one write (gateway/server_cycle.py). A client that left
    stops it: the rest of the answer is not read (its connection is closed, not reused)."""
    headers = [*response.headers, (b"x-request-id", request_id.encode("ascii"))]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    while (chunk := await response.next_chunk()) is not None:
        ended = response.ended
        try:
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
        except OSError:  # the client left (server_cycle.py): stop reading; release() closes the upstream's
            return
        if ended:
            return
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def keep_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream answer's headers for a body the gateway rewrote (length and encoding dropped)."""
    return [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type", b"content-encoding")]


async def send_json(send: Any, status: int, document: Any, request_id: str,
                    extra: list[tuple[bytes, bytes]] | None = None, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii")),
           (b"x-request-id", request_id.encode("ascii")), *(extra or [])]
    out += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Any, error: GatewayError, request_id: str) -> None:
    try:
        await send_json(send, error.status, error_body(error, request_id), request_id, headers=error.headers)
    except RuntimeError:
        # The response had already started (an upstream stream broke midway): nothing to add.
        log.warning("request %s: error after the response started: %s", request_id, error.code)
