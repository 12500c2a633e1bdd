"""Running the gateway under uvicorn, with the limits a front door needs.

`TargetProtocol` extends uvicorn's httptools protocol in these ways:
- it keeps the request line's target as received in the scope extension
  `scopegate.request_target` (httptools parses absolute-form targets and drops fragments before
  the application sees them, so the gateway could not refuse them); `surfaces.http.request_target`
  prefers it over `raw_path`;
- a client must finish its request line and headers within `HEADER_TIMEOUT_S` of connecting (or
  of starting the next request on a kept-alive connection), else 408 and the connection closes:
  idle or slow clients cannot hold the connection cap;
- chunked trailers never join the request's headers (the scope gets its own copy);
- the request line and headers together may not exceed `MAX_HEADER_BYTES` nor `MAX_HEADERS`
  fields (httptools ignores uvicorn's h11 size setting), else 431;
- a proxied request (any path but the gateway's own API and console) runs in `OneWriteCycle`
  (server_cycle.py), which writes an answer's head with its first body bytes.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import socket
import urllib.parse
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.errors import ConfigError
from gateway.server_cycle import OneWriteCycle

HEADER_TIMEOUT_S = 5.0
OWN_PREFIXES = ("/_gateway/", "/.well-known/")  # the gateway's own API and console (app.py)
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
GC_YOUNG_THRESHOLD = 10_000  # allocations between collections of the youngest generation (CPython: 700)


class HeaderSectionTooLarge(Exception):
    pass


# A response that streams until its client leaves marks its ASGI scope with this key (the console's
# audit events, gateway/console/audit_view.py), so that stopping the server ends it.
ENDLESS = "scopegate.endless"


class TargetProtocol(HttpToolsProtocol):
    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _header_count = 0
    _too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """A graceful stop lets responses in flight finish; one that never ends by itself (the web
        console's live audit stream, whose scope says so under ENDLESS) is cut: its connection is
        closed, which the app sees as its client leaving."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.scope.get(ENDLESS):
            self.transport.close()
            return
        super().shutdown()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = self._header_count = 0
        if self._header_timer is None:
            self._start_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """uvicorn's, but for the cycle it starts: a proxied request's answer goes out in one write
        where it can (server_cycle.py); the gateway's own API and console keep uvicorn's cycle."""
        self._stop_header_timer()
        target = bytes(self.url)
        scope: Any = self.scope
        parser = self.parser
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed = httptools.parse_url(self.url)
        raw_path, path = parsed.path, parsed.path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = parsed.query or b""
        # The request line's target as received; httptools reports chunked trailers through
        # on_header, which appends to the list the scope shares: the application gets its own copy,
        # so trailers never become headers.
        scope["extensions"] = {"scopegate.request_target": target}
        scope["headers"] = list(self.headers)
        app = self.app
        if self.limit_concurrency is not None and (len(self.connections) >= self.limit_concurrency
                                                   or len(self.tasks) >= self.limit_concurrency):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        cycle_class = RequestResponseCycle if path.startswith(OWN_PREFIXES) else OneWriteCycle
        existing = self.cycle
        self.cycle = cycle_class(
            scope=scope, transport=self.transport, flow=self.flow, logger=self.logger,
            access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(), on_response=self.on_response_complete)
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined: it waits for the answer before it
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._send_and_close(b"431 Request Header Fields Too Large",
                                 b"request line and headers are too large; send less than 64 KiB in at most 100 fields")
        else:
            super().send_400_response(msg)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES or self._header_count > MAX_HEADERS:
            self._too_large = True
            raise HeaderSectionTooLarge  # httptools turns this into a parser error: send_400_response

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self._send_and_close(b"408 Request Timeout",
                                 b"the request line and headers did not arrive in time")

    def _send_and_close(self, status: bytes, message: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: " + str(len(message)).encode() + b"\r\nconnection: close\r\n\r\n"
                             + message)
        self.transport.close()


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket; `reuse_port`: one of several on the same port (one per worker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted connections inherit it: without it, a response written in two parts (headers,
    # body) waits ~40 ms for the client's delayed ACK (Nagle's algorithm).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); {_bind_advice(exc)}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_workers(host: str, port: int, workers: int) -> list[socket.socket]:
    """One listening socket per worker, all on one port (server_workers.py says why)."""
    first = bind(host, port, reuse_port=True)
    port = first.getsockname()[1]
    return [first, *(bind(host, port, reuse_port=True) for _ in range(workers - 1))]


def _bind_advice(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "--host must be an IP address or a name this machine resolves"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "that address is not on this machine; pick another --host (0.0.0.0 for every interface)"
    if exc.errno == errno.EACCES:
        return "ports below 1024 need privileges; pick a port from 1024 with --port"
    return "the port is taken; pick another --port (0 picks a free one)"


def serve(app: Any, sock: socket.socket) -> None:
    """Serve `app` on a bound socket until stopped, the startup heap frozen first."""
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0))
    freeze_startup_heap()
    # Server.run, not asyncio.run: it honours the config's loop (uvloop when installed).
    server.run(sockets=[sock])


def freeze_startup_heap() -> None:
    """Take what startup loaded (modules, route map, policy, keyring, config) out of the cyclic
    garbage collector's reach, for a serving process. It lives as long as the process, yet every
    full collection walked it again: measured with bench/ at concurrency 50, the gateway's p99
    fell from ~55 ms to ~17 ms with it frozen. Objects created later (requests, reloaded policies)
    are collected as usual.

    The youngest generation is collected every `GC_YOUNG_THRESHOLD` allocations instead of 700: a
    request leaves no cyclic garbage (gc.DEBUG_SAVEALL over 1,000 proxied requests saved none), so
    those collections found nothing, yet at c=50 they ran every ~30 requests and, with the older
    generations they trigger, took 3.6% of the gateway's CPU (bench, gc.callbacks); at 10,000 they
    take 0.3%."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def uvicorn_config(app: Any, *, host: str, port: int, workers: int = 1, factory: bool = False,
                   log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, workers=workers, factory=factory, http=TargetProtocol, loop="auto",
        lifespan="on", access_log=False, log_level=log_level, server_header=False, date_header=False,
        proxy_headers=False, h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=30,
        limit_concurrency=2048,
    )


def serve_workers(sockets: list[socket.socket]) -> None:
    """Serve with one worker process per socket (`bind_workers`); each builds its own state from
    SCOPEGATE_CONFIG (set by the CLI)."""
    from gateway.server_workers import WorkerSockets

    host, port = sockets[0].getsockname()[:2]
    config = uvicorn_config("gateway.app:create_app", host=host, port=port, workers=len(sockets), factory=True)
    WorkerSockets(config, sockets).run()
