"""The upstream client: forwards one authorized request and streams the answer back.

aiohttp's client is used on this path because it measured several times faster than httpx
here (DESIGN section 1). The target is passed with `encoded=True` so that yarl neither
re-encodes nor normalizes it: the bytes forwarded are the bytes authorized. Redirects are never
followed and responses are not decompressed (they are relayed as they came). Request headers
are rebuilt from an allow-list the surface passes (`build_headers(allowed=...)`): only the
headers a real client of that API needs reach the upstream, so nothing a client invents (an
address, a region or instance to route to, a re-targeting URL, a credential) gets there; the
upstream credential and the gateway's own X-Forwarded-* / X-Request-Id are set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import UpstreamTimeout, UpstreamUnavailable

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
DROP_RESPONSE = HOP_BY_HOP


@dataclass
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    content_length: int | None
    response: aiohttp.ClientResponse
    started: float

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.response.content.iter_any():
            yield chunk

    async def read_all(self, limit: int) -> bytes:
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise UpstreamUnavailable(f"the upstream answer is larger than {limit} bytes and cannot be filtered")
        return bytes(data)

    def release(self) -> None:
        self.response.release()


class UpstreamClient:
    def __init__(self, base_url: str, *, auth_scheme: str, credential: str, connect_timeout_s: float,
                 read_timeout_s: float, basic_user: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        # An image registry takes the credential as HTTP basic auth (`x` / token, as docker logs in):
        # `basic_user` says so; every other upstream takes `<auth_scheme> <credential>`.
        self._authorization = (f"{auth_scheme} {credential}" if basic_user is None else
                               "Basic " + base64.b64encode(f"{basic_user}:{credential}".encode()).decode("ascii"))
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def build_headers(self, client_headers: list[tuple[bytes, bytes]], *, allowed: frozenset[bytes], client_ip: str,
                      scheme: str, request_id: str) -> CIMultiDict[str]:
        """The upstream request's headers: the client's headers named in `allowed` (lower-case names,
        the surface's allow-list) and not nominated hop-by-hop by its Connection header, then the
        credential and what the gateway asserts. Content-Length is never copied: the client sends
        the body's framing, aiohttp writes the forwarded body's (from the bytes, or the surface sets
        it for a stream it passes through)."""
        named_by_connection: set[bytes] = set()
        host = ""
        for name, value in client_headers:
            if name == b"connection":
                named_by_connection.update(v.strip().lower() for v in value.split(b","))
            elif name == b"host":
                host = value.decode("latin-1")
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in client_headers:
            if name in allowed and name not in GATEWAY_SET and name not in named_by_connection:
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
        headers["Authorization"] = self._authorization
        headers["X-Forwarded-For"] = client_ip
        headers["X-Forwarded-Proto"] = scheme
        if host:
            headers["X-Forwarded-Host"] = host
        headers["X-Request-Id"] = request_id
        return headers

    async def get_json(self, path: str, request_id: str) -> tuple[int, Any]:
        """GET a gateway-built path (never a client's) for the gateway's own checks."""
        headers: CIMultiDict[str] = CIMultiDict({"Authorization": self._authorization, "Accept": "application/json",
                                                  "X-Request-Id": request_id})
        response = await self.send("GET", path.encode("ascii"), headers, None)
        try:
            body = await response.read_all(4 * 1024 * 1024)
        finally:
            response.release()
        try:
            return response.status, json.loads(body) if body else None
        except ValueError:
            return response.status, None

    async def send(self, method: str, target: bytes, headers: CIMultiDict[str],
                   body: bytes | AsyncIterator[bytes] | None) -> UpstreamResponse:
        if self._session is None:
            raise UpstreamUnavailable("the upstream client is not started")
        url = upstream_url(self.base, target)
        started = time.perf_counter()
        try:
            response = await self._session.request(method, url, headers=headers, data=body, allow_redirects=False,
                                                    compress=None)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("the upstream did not answer in time; retry later") from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamUnavailable("the upstream refused or dropped the connection; retry later") from None
        except asyncio.CancelledError:
            raise
        headers_out = [(k, v) for k, v in response.raw_headers if k.lower() not in DROP_RESPONSE]
        return UpstreamResponse(response.status, headers_out, response.content_length, response, started)


def upstream_url(base: str, target: bytes) -> URL:
    """The upstream URL of an authorized target, which aiohttp sends byte for byte (`encoded=True`:
    no re-encoding, no normalization). yarl drops an empty query, so a target ending in a bare '?'
    keeps it as the last byte of the path: the upstream reads the target the gateway read."""
    text = base + target.decode("ascii")
    if text.endswith("?") and text.count("?") == 1:
        url = URL(text[:-1], encoded=True)
        return url.with_path(url.raw_path + "?", encoded=True)
    return URL(text, encoded=True)


def ms_since(started: float) -> float:
    """Milliseconds since `started` (a perf_counter reading), as audit records carry them."""
    return round((time.perf_counter() - started) * 1000, 3)
