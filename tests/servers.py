"""Real servers for tests: uvicorn in a thread on a free loopback port, and a recording upstream."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from gateway.server import uvicorn_config


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class ServerThread:
    """Serves an ASGI app with uvicorn in a daemon thread; `gateway_stack` uses the gateway's own config."""

    def __init__(self, app: Any, *, gateway_stack: bool = False) -> None:
        self.sock = bound_socket()
        self.port: int = self.sock.getsockname()[1]
        if gateway_stack:
            config = uvicorn_config(app, host="127.0.0.1", port=self.port)
        else:
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="auto")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@dataclass
class Received:
    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool = True  # False when the client went away before the body ended

    def header(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k == key]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"ok":true}'
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: [(b"content-type", b"application/json")])
    delay_s: float = 0.0


class RecordingUpstream:
    """An upstream that records every request it receives and answers with `reply` (or `replies[path]`)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.reply = Reply()
        self.replies: dict[bytes, Reply] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        complete = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                complete = False
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.received.append(Received(scope["method"], scope["raw_path"], scope["query_string"],
                                      list(scope["headers"]), body, complete))
        if not complete:
            return
        reply = self.replies.get(scope["raw_path"], self.reply)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
        await send({"type": "http.response.body", "body": reply.body})

    def clear(self) -> None:
        self.received.clear()


def raw_request(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (for targets an HTTP client would normalize); parse the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = _content_length(head)
                if length is not None and len(rest) >= length:
                    break
                if b"transfer-encoding: chunked" in head.lower() and rest.endswith(b"0\r\n\r\n"):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def json_body(body: bytes) -> Any:
    return json.loads(body)
