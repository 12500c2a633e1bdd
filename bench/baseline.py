"""The baseline: the bare pass-through proxy a user would write in an afternoon.

Starlette's server stack (uvicorn with httptools and uvloop, served with
`gateway.server.uvicorn_config`, the startup heap frozen as `scopegate serve` does) and aiohttp's
client, the usual pair: a raw ASGI app that forwards every request with an
`aiohttp.ClientSession` (kept-alive pool, no decompression, no redirects, the client's headers
cut to the same allow-list as the gateway's Machines surface, the credential injected) and
streams the answer back. No canonicalization, no token, no route, no decision, no audit record.
The gateway is measured against it (issue 19: the gateway's own forwarding path must beat it).

    python bench/baseline.py --upstream http://127.0.0.1:8081 --port 8082

`--client httpx` swaps the upstream client for an httpx.AsyncClient doing the same job and
`--client scopegate` for the gateway's own (gateway.upstream.client.UpstreamClient), for
`bench/clients.py` (the choice of client by measurement); `bench/run` uses aiohttp.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import uvicorn
from yarl import URL

from gateway.server import freeze_startup_heap, uvicorn_config
from gateway.surfaces.machines.surface import MACHINES_HEADERS
from gateway.upstream.client import UpstreamClient

CREDENTIAL = "baseline-upstream-credential"
HOP_BY_HOP = (b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade")


class _PassThroughApp:
    """ASGI: starts and stops its client with the server, hands every HTTP request to `forward`."""

    async def _start(self) -> None: ...

    async def _stop(self) -> None: ...

    async def forward(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise NotImplementedError

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self._start, self._stop)
        elif scope["type"] == "http":
            await self.forward(scope, receive, send)


class PassThrough(_PassThroughApp):
    """ASGI: forward every request upstream with aiohttp's client, relay the answer."""

    def __init__(self, upstream_url: str) -> None:
        self.base = upstream_url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def _start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=75),
            cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def _stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert self.session is not None
        request_id = uuid.uuid4().hex
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k in MACHINES_HEADERS]
        headers += [("Authorization", f"Bearer {CREDENTIAL}"), ("X-Request-Id", request_id),
                    ("X-Forwarded-For", (scope.get("client") or ("", 0))[0])]
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        body = await _read_body(receive) if _has_body(scope) else None
        url = URL(self.base + target.decode("ascii"), encoded=True)
        async with self.session.request(scope["method"], url, headers=headers, data=body or None,
                                        allow_redirects=False) as response:
            out = [(k.lower(), v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP]
            out.append((b"x-request-id", request_id.encode("ascii")))
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class ScopegateClientPassThrough(_PassThroughApp):
    """The same pass-through with the gateway's own upstream client (bench/clients.py only)."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream = UpstreamClient(upstream_url, auth_scheme="Bearer", credential=CREDENTIAL,
                                       connect_timeout_s=5, read_timeout_s=75)

    async def _start(self) -> None:
        await self.upstream.start()

    async def _stop(self) -> None:
        await self.upstream.close()

    async def forward(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request_id = uuid.uuid4().hex
        headers = self.upstream.build_headers(scope["headers"], allowed=MACHINES_HEADERS,
                                              client_ip=(scope.get("client") or ("", 0))[0],
                                              scheme=scope.get("scheme", "http"), request_id=request_id)
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        body = await _read_body(receive) if _has_body(scope) else None
        response = await self.upstream.send(scope["method"], target, headers, body or None)
        try:
            out = [*response.headers, (b"x-request-id", request_id.encode("ascii"))]
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            response.release()


class HttpxPassThrough(_PassThroughApp):
    """The same pass-through with httpx.AsyncClient as the upstream client (bench/clients.py only)."""

    def __init__(self, upstream_url: str) -> None:
        self.base = upstream_url.rstrip("/")
        self.helper = UpstreamClient(upstream_url, auth_scheme="Bearer", credential=CREDENTIAL,
                                     connect_timeout_s=5, read_timeout_s=75)  # for build_headers only
        self.client: Any = None

    async def _start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=5, read=75, write=75, pool=None), follow_redirects=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000))

    async def _stop(self) -> None:
        await self.client.aclose()

    async def forward(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request_id = uuid.uuid4().hex
        headers = self.helper.build_headers(scope["headers"], allowed=MACHINES_HEADERS,
                                            client_ip=(scope.get("client") or ("", 0))[0],
                                            scheme=scope.get("scheme", "http"), request_id=request_id)
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        body = await _read_body(receive) if _has_body(scope) else None
        request = self.client.build_request(scope["method"], self.base + target.decode("ascii"),
                                            headers=[(k.decode("latin-1"), v.decode("latin-1"))
                                                     for k, v in headers.items], content=body or None)
        response = await self.client.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in (b"connection", b"keep-alive",
                                                                               b"transfer-encoding")]
            out.append((b"x-request-id", request_id.encode("ascii")))
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def _has_body(scope: dict[str, Any]) -> bool:
    for name, value in scope["headers"]:
        if (name == b"content-length" and value != b"0") or name == b"transfer-encoding":
            return True
    return False


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body
        body += bytes(message.get("body", b""))
        if not message.get("more_body", False):
            return body


async def _lifespan(receive: Any, send: Any, start: Any, stop: Any) -> None:
    message = await receive()
    assert message["type"] == "lifespan.startup"
    await start()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await stop()
    await send({"type": "lifespan.shutdown.complete"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:8081")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client", choices=("aiohttp", "httpx", "scopegate"), default="aiohttp")
    args = parser.parse_args()
    apps = {"aiohttp": PassThrough, "httpx": HttpxPassThrough, "scopegate": ScopegateClientPassThrough}
    app = apps[args.client](args.upstream)
    server = uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port))
    freeze_startup_heap()  # as `scopegate serve` does: the same server stack
    # Server.run, not asyncio.run(server.serve()): it honours the config's event loop ("auto":
    # uvloop when installed), which is the stack uvicorn_config describes.
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
