"""The ASGI application: the gateway's own endpoints, and the proxy for everything else.

Paths under `/_gateway/` and `/.well-known/jwks.json` are answered here and never forwarded;
every other request goes through `Proxy`. The lifespan starts and stops what needs the event
loop (upstream session, store change feed).
"""

from __future__ import annotations

import os
from typing import Any

from gateway.admin import create_admin_app
from gateway.config import load_config
from gateway.proxy import Proxy
from gateway.server import freeze_startup_heap
from gateway.state import GatewayState

OWN_PREFIXES = ("/_gateway/", "/.well-known/")


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
    app = GatewayApp(GatewayState.build(config))
    freeze_startup_heap()  # each worker process builds its own state: freeze it there
    return app
