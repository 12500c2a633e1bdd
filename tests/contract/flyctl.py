"""Runs the real flyctl (.tools/bin/flyctl, built by scripts/install-test-tools) against a base URL.

Everything flyctl would send to Fly is pointed at one base URL (the Machines API, GraphQL, uiex
REST and logs), and everything else it sends is kept on this machine: its OpenTelemetry traces go
to `TraceSink` (flyctl sends the token there, over plain HTTP, on every deploy), metrics and the
update and incident checks are off, and HOME is a fresh folder so no config of this machine's user
leaks in. LaunchDarkly is hard-coded and cannot be redirected; without a network it fails fast.

`Recorder` wraps an ASGI app and writes down each request flyctl made (method, path, query, the
Authorization scheme, the body): tests assert on it, and `flyctl_calls.md` is made from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[2]
# scripts/install-test-tools builds it there; FLYCTL names another binary (built from flyctl's source
# where the Go module proxy does not serve it: docs/clients.md).
FLYCTL = Path(os.environ.get("FLYCTL") or ROOT / ".tools" / "bin" / "flyctl")
# flyctl appends ":4318" to FLY_TRACE_COLLECTOR_URL (internal/tracing/tracing.go), so the sink's port
# is fixed; it moves to another loopback address instead when 127.0.0.1:4318 is taken.
OTEL_PORT = 4318


def require_flyctl() -> Path:
    """Fails (never skips) when the binary is missing: a skipped contract test proves nothing."""
    if not FLYCTL.is_file() or not os.access(FLYCTL, os.X_OK):
        pytest.fail(f"{FLYCTL} is missing: run scripts/install-test-tools first (it needs Go and a Go module "
                    "proxy that serves github.com/superfly/flyctl), or set FLYCTL to a flyctl binary",
                    pytrace=False)
    return FLYCTL


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return (f"flyctl {' '.join(self.args)} exited {self.returncode}\n"
                f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")


class _SinkHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        sink = self.server.sink  # type: ignore[attr-defined]
        sink.received.append((self.path, self.headers.get("authorization", "")))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class TraceSink:
    """Accepts flyctl's OTLP/HTTP trace exports and keeps only their paths and Authorization values."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []
        for last in range(1, 255):
            try:
                self.server = ThreadingHTTPServer((f"127.0.0.{last}", OTEL_PORT), _SinkHandler)
                break
            except OSError:
                continue
        else:
            raise RuntimeError(f"no loopback address has port {OTEL_PORT} free for the trace sink")
        self.server.sink = self  # type: ignore[attr-defined]
        self.host = str(self.server.server_address[0])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TraceSink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@dataclass
class Call:
    method: str
    path: str
    query: str
    authorization: str
    headers: list[str]  # names, in the order sent
    body: Any
    status: int = 0  # the answer's status, once it is sent

    @property
    def auth_scheme(self) -> str:
        return self.authorization.partition(" ")[0] if " " in self.authorization else "(none)"

    @property
    def graphql(self) -> str | None:
        """The GraphQL document, verbatim, if this was a GraphQL request."""
        if self.path == "/graphql" and isinstance(self.body, dict) and isinstance(self.body.get("query"), str):
            return str(self.body["query"])
        return None


@dataclass
class Recorder:
    """ASGI middleware: records every HTTP request before passing it on, body included."""

    app: ASGIApp
    calls: list[Call] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        auth = dict(headers).get(b"authorization", b"").decode("latin-1")
        try:
            body: Any = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        call = Call(scope["method"], scope["path"], scope["query_string"].decode("latin-1"), auth,
                    [k.decode("latin-1") for k, _ in headers], body)
        self.calls.append(call)
        replayed = False

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.status = int(message["status"])
            await send(message)

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_noting_status)


@dataclass
class Flyctl:
    """One flyctl configuration: where it sends everything, with which token, from which folder."""

    base_url: str
    token: str
    trace_host: str
    home: Path
    cwd: Path
    timeout: float = 120.0

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TMPDIR", "TZ")}
        return {
            **keep, "HOME": str(self.home), "FLY_API_TOKEN": self.token,
            "FLY_FLAPS_BASE_URL": self.base_url, "FLY_API_BASE_URL": self.base_url,
            "FLY_UIEX_BASE_URL": self.base_url, "FLY_TRACE_COLLECTOR_URL": self.trace_host,
            "FLY_METRICS_BASE_URL": self.base_url, "FLY_SEND_METRICS": "0", "FLY_NO_UPDATE_CHECK": "1",
            "FLY_NO_INCIDENTS_CHECK": "1", "FLY_NO_METRICS": "1", "NO_COLOR": "1", "CI": "true",
        }

    def run(self, *args: str) -> Result:
        binary = require_flyctl()
        try:
            done = subprocess.run([str(binary), *args], env=self.env(), cwd=self.cwd, capture_output=True,
                                  text=True, timeout=self.timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as expired:
            out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
            err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
            pytest.fail(f"flyctl {' '.join(args)} did not finish in {self.timeout}s\n{out}\n{err}")
        return Result(list(args), done.returncode, done.stdout, done.stderr)
