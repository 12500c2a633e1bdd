"""Open endpoints: liveness, readiness, Prometheus metrics, the public signing keys, the API's OpenAPI."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.openapi import admin_openapi
from gateway.errors import GatewayError
from gateway.services import Services


class HealthEndpoints:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> JSONResponse:
        services = self.services
        checks = {"keys": bool(services.keyring.verifying_keys()), "policy": bool(services.policy.roles()),
                  "routes": all(surface.ready() for surface in services.surfaces), "started": services.ready}
        try:
            await services.store.ping()
            checks["store"] = True
        except GatewayError:
            checks["store"] = False
        ready = all(checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                            status_code=200 if ready else 503)

    async def jwks(self, request: Request) -> JSONResponse:
        return JSONResponse(self.services.keyring.jwks(), headers={"Cache-Control": "max-age=300"})

    async def metrics(self, request: Request) -> Response:
        services = self.services
        text = services.metrics.render(decision_cache_hits=services.authorizer.cache_hits,
                                       token_cache_hits=services.authorizer.verifier.cache_hits)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(admin_openapi())
