"""The ASGI application: the gateway's own endpoints, and the proxy for everything else.

Paths under `/_gateway/` and `/.well-known/jwks.json` are answered here and never forwarded;
every other request goes through `Proxy`. The lifespan starts and stops what needs the event
loop (upstream session, store change feed).
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.config import load_config
from gateway.errors import GatewayError, error_body
from gateway.proxy import Proxy
from gateway.state import GatewayState

OWN_PREFIXES = ("/_gateway/", "/.well-known/")


def create_admin_app(state: GatewayState) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        checks = {"keys": bool(state.keyring.verifying_keys()), "policy": bool(state.policy.roles()),
                  "routes": bool(state.routes.routes), "started": state.ready}
        try:
            await state.store.ping()
            checks["store"] = True
        except GatewayError:
            checks["store"] = False
        ready = all(checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                            status_code=200 if ready else 503)

    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse(state.keyring.jwks(), headers={"Cache-Control": "max-age=300"})

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        error = GatewayError(f"{request.method} {request.url.path} is not an endpoint of the gateway")
        error.status, error.code = 404, "not_found"
        return JSONResponse(error_body(error, ""), status_code=404)

    async def gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return JSONResponse(error_body(exc, ""), status_code=exc.status, headers=exc.headers)

    return Starlette(
        routes=[
            Route("/_gateway/healthz", healthz, methods=["GET"]),
            Route("/_gateway/readyz", readyz, methods=["GET"]),
            Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_found, GatewayError: gateway_error},
    )


class GatewayApp:
    """The ASGI callable uvicorn serves."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.proxy = Proxy(state)
        self.admin = create_admin_app(state)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"].startswith(OWN_PREFIXES):
                await self.admin(scope, receive, send)
            else:
                await self.proxy(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # websockets: not part of the upstream API, refused by not accepting.

    async def _lifespan(self, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            await self.state.start()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": f"{exc.__class__.__name__}: {exc}"})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        try:
            await self.state.stop()
        finally:
            await send({"type": "lifespan.shutdown.complete"})


def create_app() -> GatewayApp:
    """Factory for `uvicorn --factory` and multi-worker serving: config from SCOPEGATE_CONFIG."""
    config = load_config(os.environ.get("SCOPEGATE_CONFIG"))
    return GatewayApp(GatewayState.build(config))
