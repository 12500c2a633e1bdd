"""The ASGI application: the gateway's own API, and a surface for everything else.

Paths under `/_gateway/` and `/.well-known/` are the gateway's own API (api/) and are never
forwarded; every other request goes to the first surface that serves its path (the Machines API
serves whatever no other surface does, refusing unknown operations). The lifespan starts and
stops what needs the event loop (services.py).
"""

from __future__ import annotations

import os
from typing import Any

from gateway.api.app import create_api_app
from gateway.config import load_config
from gateway.console.app import create_console_app
from gateway.errors import ConfigError
from gateway.server import OWN_PREFIXES, freeze_startup_heap
from gateway.services import Services

CONSOLE_PREFIX = "/_gateway/ui/"


class GatewayApp:
    """The ASGI callable uvicorn serves."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.api = create_api_app(services)
        self.console = create_console_app(services) if services.config.ui_enabled else None
        # The last surface serves every path no other one does (the Machines API); the others are
        # asked only for paths under one of their prefixes, so most requests cost one startswith.
        *self.specific, self.default = services.surfaces
        if self.default.prefixes != ("",):
            raise ConfigError(f"the last surface ({self.default.name}) must serve every path no other one does")
        self.prefixes = tuple(prefix for surface in self.specific for prefix in surface.prefixes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if path.startswith(OWN_PREFIXES):
                if self.console is not None and path.startswith(CONSOLE_PREFIX):
                    await self.console(scope, receive, send)
                    return
                await self.api(scope, receive, send)
                return
            if path.startswith(self.prefixes):
                for surface in self.specific:
                    if surface.serves(path):
                        await surface(scope, receive, send)
                        return
            await self.default(scope, receive, send)  # it serves every path (unknown ones: unknown_route)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # websockets: not part of any upstream API, refused by not accepting.

    async def _lifespan(self, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            await self.services.start()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": f"{exc.__class__.__name__}: {exc}"})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        try:
            await self.services.stop()
        finally:
            await send({"type": "lifespan.shutdown.complete"})


def create_app() -> GatewayApp:
    """Factory for `uvicorn --factory` and multi-worker serving: config from SCOPEGATE_CONFIG."""
    config = load_config(os.environ.get("SCOPEGATE_CONFIG"))
    app = GatewayApp(Services.build(config))
    freeze_startup_heap()  # each worker process builds its own state: freeze it there
    return app
