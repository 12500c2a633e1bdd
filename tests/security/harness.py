"""Shared pieces of the adversarial suite: raw requests, a module-scoped gateway, strict assertions.

Every case in `tests/security/` ends with one of two assertions about the recording upstream:
`assert_nothing_forwarded` (the request was refused before the upstream call) or
`assert_forwarded_exactly` (one complete request, with the method, raw path, query and body that
were authorized, the injected `Authorization: Bearer <credential>` and no trace of the client's
token). Requests are written byte by byte (`request`) so that no HTTP client normalizes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.servers import Received, RecordingUpstream, Reply, ServerThread, raw_request

CREDENTIAL = UPSTREAM_SECRET
INJECTED = f"Bearer {CREDENTIAL}"
HOST = b"gateway.test"


# --- requests ---------------------------------------------------------------------------------

def request(method: bytes | str, target: bytes, *, token: str | None = None, scheme: str = "Bearer",
            headers: Sequence[tuple[bytes, bytes]] = (), body: bytes | None = None, host: bytes | None = HOST,
            version: bytes = b"HTTP/1.1", close: bool = True) -> bytes:
    """One request, exactly as written. `body` adds a Content-Length unless a header frames it already."""
    verb = method.encode("ascii") if isinstance(method, str) else method
    lines = [verb + b" " + target + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    if token is not None:
        lines.append(f"Authorization: {scheme} {token}".encode("ascii"))
    lines += [name + b": " + value for name, value in headers]
    framed = any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers)
    if body is not None and not framed:
        lines.append(b"Content-Length: " + str(len(body)).encode("ascii"))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        """The gateway's `error` code, or None when the body is not the gateway's JSON error."""
        try:
            document = self.json()
        except ValueError:
            return None
        return document.get("error") if isinstance(document, dict) else None


def send(gateway: RunningGateway, data: bytes, timeout: float = 5.0) -> Answer:
    status, headers, body = raw_request(gateway.port, data, timeout=timeout)
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return Answer(status, headers, body)


def converse(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` and return every byte the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    return received


def statuses(answer: bytes) -> list[int]:
    """The status of every response in a byte stream (pipelined answers), in order."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


def dechunk(body: bytes) -> bytes:
    out = b""
    rest = body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return out


# --- assertions -------------------------------------------------------------------------------

def assert_nothing_forwarded(gateway: RunningGateway) -> None:
    assert gateway.upstream.received == [], [(r.method, r.raw_path) for r in gateway.upstream.received]


def assert_refused(gateway: RunningGateway, answer: Answer, status: int | tuple[int, ...],
                   error: str | None = None) -> None:
    """A refusal: the status (one of them, where a fix may reasonably choose either), the gateway's
    error code when it answered, nothing upstream, no secret."""
    allowed = status if isinstance(status, tuple) else (status,)
    assert answer.status in allowed, (answer.status, answer.body[:300])
    if error is not None:
        assert answer.error == error, answer.body[:300]
    if status == 401 and error is not None:
        assert answer.headers.get("www-authenticate") == 'Bearer error="invalid_token"'
    assert CREDENTIAL.encode() not in answer.body
    assert_nothing_forwarded(gateway)


def assert_forwarded_exactly(gateway: RunningGateway, *, method: str, raw_path: bytes, query: bytes = b"",
                             body: bytes = b"", client_tokens: Iterable[str] = ()) -> Received:
    """Exactly one complete request reached the upstream, and it is the one that was authorized."""
    received = gateway.upstream.received
    assert len(received) == 1, [(r.method, r.raw_path, r.query) for r in received]
    got = received[0]
    assert got.complete
    assert got.method == method
    assert got.raw_path == raw_path
    assert got.query == query
    assert got.body == body
    assert got.header("authorization") == [INJECTED]
    assert got.header("proxy-authorization") == []
    for token in client_tokens:
        assert_token_absent(got, token)
    return got


def assert_token_absent(got: Received, token: str) -> None:
    needle = token.encode("ascii")
    bare = token.removeprefix("sgt_").encode("ascii")
    everything = b"\n".join([got.raw_path, got.query, got.body, *(k + b": " + v for k, v in got.headers)])
    assert needle not in everything
    assert bare not in everything


# --- a gateway per module ---------------------------------------------------------------------

@contextlib.contextmanager
def running_gateway(folder: Path, *, upstream_urls: dict[str, str] | None = None,
                    **sections: dict[str, Any]) -> Iterator[RunningGateway]:
    """A recording upstream and a gateway (the real uvicorn stack) in front of it. `upstream_urls`:
    upstream keys set to the recording upstream's URL plus the given suffix (another surface's
    upstream, `{"graphql_url": "/graphql"}`)."""
    recorder = RecordingUpstream()
    recorder_server = ServerThread(recorder).start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(CREDENTIAL_ENV, CREDENTIAL)
            if upstream_urls:
                sections["upstream"] = {**sections.get("upstream", {}),
                                        **{key: recorder_server.url + suffix for key, suffix in upstream_urls.items()}}
            gateway = start_gateway(folder, recorder, recorder_server, **sections)
            try:
                yield gateway
            finally:
                gateway.server.stop()
    finally:
        recorder_server.stop()


def reset(gateway: RunningGateway) -> RunningGateway:
    """Forget what earlier cases did to the shared upstream."""
    gateway.upstream.clear()
    gateway.upstream.reply = Reply()
    gateway.upstream.replies.clear()
    return gateway


def audit_record(gateway: RunningGateway, answer: Answer) -> dict[str, Any]:
    """The audit record of the request `answer` answered (written just after the response is sent)."""
    request_id = answer.headers.get("x-request-id")
    assert request_id, answer.headers
    found: list[dict[str, Any]] = []

    def written() -> bool:
        found[:] = [r for r in gateway.audit_records() if r.get("request_id") == request_id]
        return bool(found)

    assert wait_for(written), f"no audit record for request {request_id}"
    return found[0]


def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# --- logs -------------------------------------------------------------------------------------

# Not `uvicorn.access`: uvicorn turns its access log on for any connection whose access logger has
# a handler, so capturing it would log what the gateway's server config (access_log=False) never does.
LOGGERS = ("", "scopegate", "uvicorn", "uvicorn.error", "aiohttp", "asyncio", "starlette")


class LogCapture(logging.Handler):
    """Every record of the gateway's, uvicorn's and aiohttp's loggers (uvicorn's do not propagate to root)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @contextlib.contextmanager
    def attached(self) -> Iterator[LogCapture]:
        loggers = [logging.getLogger(name) for name in LOGGERS]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.addHandler(self)
            logger.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.removeHandler(self)
                logger.setLevel(level)


# --- how a Go server reads a forwarded path ---------------------------------------------------

def go_unescape(segment: bytes) -> bytes | None:
    """Go's url.PathUnescape: every %XX decoded; None where Go would refuse the escape."""
    out = bytearray()
    i = 0
    while i < len(segment):
        byte = segment[i]
        if byte == 0x25:
            digits = segment[i + 1:i + 3]
            if len(digits) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in digits):
                return None
            out.append(int(digits, 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def go_clean(path: bytes) -> bytes:
    """Go's path.Clean, which net/http's ServeMux applies (redirecting) before it routes."""
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return b"/" + b"/".join(parts)


def go_app_of(raw_path: bytes) -> bytes | None:
    """The app a Go upstream would act on for this forwarded path: the segment after /v1/apps/,
    read both from the decoded-then-cleaned path and from the raw segments (whichever a router
    uses), or None when the two readings disagree."""
    decoded = go_unescape(raw_path)
    if decoded is None:
        return None
    readings = set()
    cleaned = go_clean(decoded).split(b"/")
    if cleaned[1:3] == [b"v1", b"apps"] and len(cleaned) > 3:
        readings.add(cleaned[3])
    raw = raw_path.split(b"/")
    if raw[1:3] == [b"v1", b"apps"] and len(raw) > 3:
        readings.add(go_unescape(raw[3]) or b"")
    return readings.pop() if len(readings) == 1 else None
