"""HTTP/1.1 to one upstream on raw asyncio connections, kept alive in a pool.

The forwarding half of the gateway's hot path (issue 19): a request goes out as one buffer of
bytes (request line, headers, body) on a kept-alive connection, and the answer is parsed by
httptools (llhttp, the parser the server side uses) straight into the `UpstreamResponse` the
surfaces relay. Measured with bench/ against aiohttp's client doing the same job, it costs a
fraction of the CPU per request (docs/performance.md).

What it does, and deliberately nothing more:
- one request at a time per connection, no pipelining; a connection goes back to the pool only
  after its answer was read to the end, framed and kept alive by the upstream, with no bytes after
  it, and not after a HEAD, 204 or 304 answer announcing a body (sent late, it would answer the
  next request); idle connections are closed after IDLE_S;
- the request target is sent byte for byte as authorized (no re-encoding, no normalization);
- a body is bytes (Content-Length from them), a stream (chunked, or passed through as the client
  framed it when the caller sets Content-Length), or nothing;
- 1xx answers are skipped, redirects never followed, answers never decompressed;
- timeouts: `connect_timeout_s` to connect (TLS included), `read_timeout_s` for every wait on the
  upstream (its answer's head, each part of its body, room to write a streamed body);
- a kept-alive connection the upstream closed just as it was reused is retried once on a fresh
  one, for idempotent methods with a body that can be sent again (a POST is not resent: the
  upstream may have acted on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import cast

import httptools

from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.headers import OutgoingHeaders
from gateway.upstream.response import UpstreamResponse

__all__ = ["ConnectionDropped", "ConnectionPool", "OutgoingHeaders", "UpstreamConnection", "UpstreamResponse"]

# Hop-by-hop response headers (RFC 9110 section 7.6.1): the gateway frames its own answer.
DROP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate",
})
IDLE_S = 4.0  # a kept-alive connection idle longer is closed, not reused (uvicorn's own limit is 5 s)
MAX_IDLE = 512  # connections kept per upstream; more are closed when released
HIGH_WATER = 256 * 1024  # answer bytes buffered before the upstream connection stops being read
MAX_HEAD_BYTES = 256 * 1024  # an answer's status line and headers, at most (aiohttp allowed less per line)
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
NO_BODY_STATUS = (204, 304)


class ConnectionDropped(UpstreamUnavailable):
    """The upstream closed the connection before the head of its answer."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream; httptools' parser calls the `on_*` methods."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False  # the request was HEAD: its answer has no body whatever it says
        self._head_bytes = 0  # bytes received before the answer's head was complete
        self._keep_alive = False
        self._informational = False
        self._framed = False  # Content-Length or chunked: the answer's end is known without a close
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    @property
    def read_timeout_s(self) -> float:
        return self.pool.read_timeout_s

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.response is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted with another request
            return
        response = self.response
        head_pending = not response._head
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(UpstreamUnavailable("the upstream switched protocols, which the gateway never asks for"))
        except httptools.HttpParserError as exc:
            refused = exc.__context__  # what a callback below raised, when one did
            self._broken(refused if isinstance(refused, UpstreamUnavailable) else
                         UpstreamUnavailable("the upstream sent a malformed HTTP answer; retry later"))
        else:
            # Counted after parsing, only while the head is incomplete: the read that completes it may
            # carry much of the body too. httptools buffers a partial header: one read past the limit.
            if head_pending and not response._head:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._broken(UpstreamUnavailable(
                        f"the upstream's answer head is larger than {MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response._complete:
            if response._head and not self._framed and not self._head_only:
                response._complete = True  # an answer delimited by the connection's close ends here
                response._wake()
            else:
                response._fail(ConnectionDropped("the upstream dropped the connection; retry later"))
        self._wake_drain()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain()

    # httptools' parser callbacks
    def on_message_begin(self) -> None:
        response = self.response
        if response is not None:
            if response._head:  # a second answer nobody asked for: it must neither rewrite the first nor stay
                raise UpstreamUnavailable("the upstream sent more than one answer to one request")
            response.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None:
            return
        if response._head:  # a chunked answer's trailers: never relayed, bounded with the head
            self._head_bytes += len(name) + len(value)
            if self._head_bytes > MAX_HEAD_BYTES:
                raise UpstreamUnavailable(f"the upstream's answer head and trailers are larger than {MAX_HEAD_BYTES} "
                                          "bytes")
            return
        response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response, parser = self.response, self._parser
        if response is None or parser is None:
            return
        status = parser.get_status_code()
        if not 100 <= status <= 599:  # no status line for it, and no meaning
            raise UpstreamUnavailable(f"the upstream answered with status {status}, outside 100-599")
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: not the answer
            self._informational = True
            return
        self._informational = False
        self._keep_alive = parser.should_keep_alive()
        headers, length, chunked = [], None, False
        for name, value in response.headers:
            if name == b"content-length":
                length = int(value) if value.strip().isdigit() else None
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":  # relayed without it, a coded body would pass as plain
                    raise UpstreamUnavailable("the upstream used a transfer coding the gateway does not relay")
                chunked = True
            if name not in DROP_RESPONSE:
                headers.append((name, value))
        response.status, response.headers, response.content_length = status, headers, length
        self._framed = length is not None or chunked or status in NO_BODY_STATUS
        if (self._head_only or status in NO_BODY_STATUS) and (length or chunked):
            # An answer without a body that announces one: if the upstream sends it after all, late,
            # it would be read as the next request's answer. This connection is not reused.
            self._keep_alive = False
        response._head = True
        if self._head_only:
            self._parser = None  # it would wait for the body a HEAD answer announces but never sends
            response._complete = True
        response._wake()

    def on_body(self, body: bytes) -> None:
        if self._informational:  # llhttp reads one for 104-199: it would join the final answer's body
            raise UpstreamUnavailable("the upstream sent a body with an informational (1xx) answer")
        response = self.response
        if response is None or response._complete:
            self._keep_alive = False  # bytes after the end: never reuse this connection
            return
        response._body.append(body)
        response._buffered += len(body)
        if response._buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        response._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        response = self.response
        if response is not None and not response._complete:
            self._keep_alive = self._keep_alive and self._parser is not None and self._parser.should_keep_alive()
            response._complete = True
            response._wake()

    # The pool's and the response's
    def begin(self, response: UpstreamResponse, *, head_only: bool) -> None:
        self.response = response
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._head_bytes = 0
        self._keep_alive = False
        self._informational = False
        self._framed = False

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def finished(self, response: UpstreamResponse, *, reusable: bool) -> None:
        if self.response is not response:
            return
        self.response = None
        self._parser = None
        if reusable and self._keep_alive and not self.closed and not self._reading_paused:
            self.pool.give_back(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._wake_drain()

    def _broken(self, error: UpstreamUnavailable | UpstreamTimeout) -> None:
        if self.response is not None:
            self.response._fail(error)
        self.close()

    async def drain(self) -> None:
        while self._writing_paused and not self.closed:
            waiter = self._drain_waiter = self.loop.create_future()
            timer = self.loop.call_later(self.pool.read_timeout_s, self._write_timed_out)
            try:
                await waiter
            finally:
                timer.cancel()
                self._drain_waiter = None
        if self.closed and self.response is not None and self.response._error is not None:
            raise self.response._error

    def _write_timed_out(self) -> None:
        self._broken(UpstreamTimeout("the upstream did not take the request body in time; retry later"))

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class ConnectionPool:
    """Kept-alive connections to one upstream (scheme, host, port), most recently used first."""

    def __init__(self, *, host: str, port: int, tls: bool, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle: list[UpstreamConnection] = []
        self.open = True
        self._sweeper: asyncio.TimerHandle | None = None  # closes idle connections past IDLE_S

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection, and whether it was kept alive from an earlier request."""
        if not self.open:
            raise UpstreamUnavailable("the upstream client is not started")
        now = self.loop.time()
        idle = self.idle
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_S:
                return connection, True
            connection.close()
        return await self.connect(), False

    async def connect(self) -> UpstreamConnection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, protocol = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not accept a connection in time; retry later") from None
        except (OSError, ssl.SSLError):
            raise UpstreamUnavailable("the upstream refused or dropped the connection; retry later") from None
        return protocol

    def give_back(self, connection: UpstreamConnection) -> None:
        if self.open and len(self.idle) < MAX_IDLE:
            connection.idle_since = self.loop.time()
            self.idle.append(connection)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(IDLE_S, self._sweep)
        else:
            connection.close()

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        keep = []
        for connection in self.idle:
            if connection.closed or now - connection.idle_since >= IDLE_S:
                connection.close()
            else:
                keep.append(connection)
        self.idle = keep
        if keep:
            self._sweeper = self.loop.call_later(IDLE_S, self._sweep)

    def close(self) -> None:
        self.open = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()

    async def exchange(self, method: str, head: bytes, body: bytes | AsyncIterator[bytes] | None,
                       *, length_given: bool) -> UpstreamResponse:
        """Send one request (its head already encoded, framing headers included) and return its
        answer once the answer's head arrived."""
        replayable = method in REPLAYABLE and not isinstance(body, AsyncIterator)
        retried = False
        while True:
            # The retry goes on a new connection: another idle one may be just as dead, and the
            # request would go once per idle connection.
            connection, reused = (await self.connect(), False) if retried else await self.acquire()
            response = UpstreamResponse(connection, time.perf_counter())
            connection.begin(response, head_only=method == "HEAD")
            try:
                transport = connection.transport
                assert transport is not None
                if body is None or isinstance(body, bytes):
                    transport.write(head + body if body else head)
                else:
                    transport.write(head)
                    await self._stream(connection, response, body, length_given=length_given)
                await response._wait_head()
                return response
            except ConnectionDropped:
                connection.finished(response, reusable=False)
                if reused and replayable:
                    retried = True
                    continue  # the upstream closed a kept-alive connection as it was reused: once more, fresh
                raise
            except BaseException:
                connection.finished(response, reusable=False)
                raise

    async def _stream(self, connection: UpstreamConnection, response: UpstreamResponse,
                      body: AsyncIterator[bytes], *, length_given: bool) -> None:
        transport = connection.transport
        assert transport is not None
        async for chunk in body:
            if response._head or connection.closed:
                # The upstream answered (or left) before the whole body went: the rest is not sent,
                # and the connection is not reused (finished() sees the answer's framing unread).
                connection._keep_alive = False
                break
            if chunk:
                transport.write(chunk if length_given else b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if connection._writing_paused:
                    await connection.drain()
        else:
            if not length_given:
                transport.write(b"0\r\n\r\n")
