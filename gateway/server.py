"""Running the gateway under uvicorn.

uvicorn's httptools protocol parses absolute-form targets (`GET http://host/path`) and drops
fragments before the application sees them, so the gateway could not refuse them. `TargetProtocol`
keeps the request line's target as received in the scope extension `scopegate.request_target`,
which `proxy.request_target` prefers over `raw_path` and `query_string`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import GatewayApp


class TargetProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        target = bytes(self.url)
        super().on_headers_complete()
        # super() created the scope and scheduled (not yet ran) the ASGI task: adding to the
        # scope here is seen by the application.
        if getattr(self, "scope", None) is not None:
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions["scopegate.request_target"] = target


def uvicorn_config(app: Any, *, host: str, port: int, workers: int = 1, factory: bool = False,
                   log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, workers=workers, factory=factory, http=TargetProtocol, loop="auto",
        lifespan="on", access_log=False, log_level=log_level, server_header=False, date_header=False,
        proxy_headers=False, h11_max_incomplete_event_size=64 * 1024, timeout_keep_alive=30,
        limit_concurrency=2048,
    )


def serve(app: GatewayApp, *, host: str, port: int) -> None:
    server = uvicorn.Server(uvicorn_config(app, host=host, port=port))
    asyncio.run(server.serve())


def serve_workers(*, host: str, port: int, workers: int) -> None:
    # Each worker builds its own state from SCOPEGATE_CONFIG (set by the CLI).
    from uvicorn.supervisors import Multiprocess

    config = uvicorn_config("gateway.app:create_app", host=host, port=port, workers=workers, factory=True)
    Multiprocess(config, sockets=[config.bind_socket()]).run()
