"""The upstream client: forwards one authorized request and streams the answer back.

It speaks HTTP/1.1 on kept-alive connections of its own (connections.py): measured with bench/,
aiohttp's client took ~40% of the gateway's CPU per request; this one takes a fraction of that
(the choice by measurement of DESIGN section 1; docs/performance.md). The target is sent byte for
byte: the bytes forwarded are the bytes authorized. Redirects are never followed and answers are
not decompressed (they are relayed as they came). Request headers are rebuilt from an allow-list
the surface passes (`build_headers(allowed=...)`): only the headers a real client of that API
needs reach the upstream, so nothing a client invents (an address, a region or instance to route
to, a re-targeting URL, a credential) gets there; the upstream credential and the gateway's own
X-Forwarded-* / X-Request-Id are set.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import ConfigError, UpstreamUnavailable
from gateway.upstream.connections import DROP_RESPONSE, ConnectionPool, OutgoingHeaders, UpstreamResponse

__all__ = ["DROP_RESPONSE", "GATEWAY_SET", "HOP_BY_HOP", "OutgoingHeaders", "UpstreamClient", "UpstreamResponse",
           "ms_since"]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate",
})
# What the gateway itself says about a request: never taken from the client, whatever a surface's
# allow-list holds (a guard against a list that names one of them by mistake).
GATEWAY_SET = HOP_BY_HOP | frozenset({
    b"authorization", b"proxy-authorization", b"host", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-request-id", b"content-length",
})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_UNSENDABLE_IN_TARGET = (b" ", b"\r", b"\n", b"\x00", b"\t")


class UpstreamClient:
    def __init__(self, base_url: str, *, auth_scheme: str, credential: str, connect_timeout_s: float,
                 read_timeout_s: float, basic_user: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        parts = urlsplit(self.base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"upstream URL {base_url!r} must start with http:// or https:// and name a host")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        # The Host header: the URL's authority as written, without any user part.
        self._authority = parts.netloc.rpartition("@")[2].encode("idna")
        self._prefix = parts.path.encode("ascii")  # a base URL's own path (GraphQL's /graphql) goes first
        # An image registry takes the credential as HTTP basic auth (`x` / token, as docker logs in):
        # `basic_user` says so; every other upstream takes `<auth_scheme> <credential>`.
        authorization = (f"{auth_scheme} {credential}" if basic_user is None else
                         "Basic " + base64.b64encode(f"{basic_user}:{credential}".encode()).decode("ascii"))
        self._authorization = authorization.encode("latin-1")
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._pool: ConnectionPool | None = None

    async def start(self) -> None:
        self._pool = ConnectionPool(host=self._host, port=self._port, tls=self._tls,
                                    connect_timeout_s=self._connect_timeout_s, read_timeout_s=self._read_timeout_s)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def build_headers(self, client_headers: list[tuple[bytes, bytes]], *, allowed: frozenset[bytes], client_ip: str,
                      scheme: str, request_id: str) -> OutgoingHeaders:
        """The upstream request's headers: the client's headers named in `allowed` (lower-case names,
        the surface's allow-list) and not nominated hop-by-hop by its Connection header, then the
        credential and what the gateway asserts. Content-Length is never copied: the client sends
        the body's framing, `send` writes the forwarded body's (from the bytes, or the surface sets
        it for a stream it passes through)."""
        named_by_connection: set[bytes] = set()
        host = b""
        for name, value in client_headers:
            if name == b"connection":
                named_by_connection.update(v.strip().lower() for v in value.split(b","))
            elif name == b"host":
                host = value
        headers = OutgoingHeaders()
        for name, value in client_headers:
            if name in allowed and name not in GATEWAY_SET and name not in named_by_connection:
                headers.add(name, value)
        items = headers.items
        items.append((b"authorization", self._authorization))
        items.append((b"x-forwarded-for", client_ip.encode("latin-1")))
        items.append((b"x-forwarded-proto", scheme.encode("latin-1")))
        if host:
            headers.add(b"x-forwarded-host", host)
        items.append((b"x-request-id", request_id.encode("ascii")))
        return headers

    async def get_json(self, path: str, request_id: str) -> tuple[int, Any]:
        """GET a gateway-built path (never a client's) for the gateway's own checks."""
        headers = OutgoingHeaders([(b"authorization", self._authorization), (b"accept", b"application/json"),
                                   (b"x-request-id", request_id.encode("ascii"))])
        response = await self.send("GET", path.encode("ascii"), headers, None)
        try:
            body = await response.read_all(4 * 1024 * 1024)
        finally:
            response.release()
        try:
            return response.status, json.loads(body) if body else None
        except ValueError:
            return response.status, None

    async def send(self, method: str, target: bytes, headers: OutgoingHeaders,
                   body: bytes | AsyncIterator[bytes] | None) -> UpstreamResponse:
        """Forward one request; the answer comes back once its head arrived (its body streams).
        The request line carries the base URL's path and `target` exactly as given."""
        pool = self._pool
        if pool is None:
            raise UpstreamUnavailable("the upstream client is not started")
        path = self._prefix + target
        if not path.startswith(b"/"):
            path = b"/" + path
        for unsendable in _UNSENDABLE_IN_TARGET:  # canonicalize() never lets one through; never send one
            if unsendable in path:
                raise UpstreamUnavailable("the gateway built a request target it cannot send; nothing was forwarded")
        head = [method.encode("ascii"), b" ", path, b" HTTP/1.1\r\nhost: ", self._authority, b"\r\n"]
        length_given = False
        for name, value in headers.items:
            if name == b"content-length":
                length_given = True
            head += (name, b": ", value, b"\r\n")
        if isinstance(body, bytes):
            if not length_given:
                head += (b"content-length: ", str(len(body)).encode("ascii"), b"\r\n")
        elif body is not None:
            if not length_given:
                head.append(b"transfer-encoding: chunked\r\n")
        elif method in _BODY_METHODS and not length_given:
            head.append(b"content-length: 0\r\n")
        head.append(b"\r\n")
        return await pool.exchange(method, b"".join(head), body, length_given=length_given)


def ms_since(started: float) -> float:
    """Milliseconds since `started` (a perf_counter reading), as audit records carry them."""
    return round((time.perf_counter() - started) * 1000, 3)
