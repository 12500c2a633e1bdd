"""The gateway's own API as one Starlette app: every endpoint of DESIGN section 8, in one table."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.api.audit import audit_endpoint
from gateway.api.endpoint import authorized
from gateway.api.exchange import exchange_endpoint
from gateway.api.explain import explain_endpoint
from gateway.api.health import HealthEndpoints
from gateway.api.tokens import TokenEndpoints
from gateway.errors import BadRequest, NotFound, error_body
from gateway.services import Services

V1 = "/_gateway/v1"


def create_api_app(services: Services) -> Starlette:
    health = HealthEndpoints(services)
    tokens = TokenEndpoints(services)

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        error = NotFound(f"{request.method} {request.url.path} is not an endpoint of the gateway")
        return JSONResponse(error_body(error, ""), status_code=404)

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        error = BadRequest(f"{request.method} is not allowed on {request.url.path}")
        error.status, error.code = 405, "method_not_allowed"
        return JSONResponse(error_body(error, ""), status_code=405)

    app = Starlette(
        routes=[
            Route("/_gateway/healthz", health.healthz, methods=["GET"]),
            Route("/_gateway/readyz", health.readyz, methods=["GET"]),
            Route("/_gateway/metrics", health.metrics, methods=["GET"]),
            Route("/.well-known/jwks.json", health.jwks, methods=["GET"]),
            Route(f"{V1}/openapi.json", health.openapi, methods=["GET"]),
            Route(f"{V1}/tokens", authorized(services, "gateway:mint", tokens.mint), methods=["POST"]),
            Route(f"{V1}/tokens", authorized(services, "gateway:list", tokens.list), methods=["GET"]),
            Route(f"{V1}/tokens/{{jti}}", authorized(services, "gateway:show", tokens.show), methods=["GET"]),
            Route(f"{V1}/tokens/{{jti}}", authorized(services, "gateway:revoke", tokens.revoke), methods=["DELETE"]),
            Route(f"{V1}/tokens/{{jti}}/rotate", authorized(services, "gateway:rotate", tokens.rotate),
                  methods=["POST"]),
            Route(f"{V1}/token/self", authorized(services, None, tokens.own, audit_as="gateway:self"),
                  methods=["GET"]),
            Route(f"{V1}/token/attenuate", authorized(services, None, tokens.attenuate, audit_as="gateway:attenuate"),
                  methods=["POST"]),
            # RFC 8693, form-encoded; the subject token is the credential, so no bearer auth (audited inside).
            Route(f"{V1}/token/exchange", exchange_endpoint(services), methods=["POST"]),
            Route(f"{V1}/audit", authorized(services, "gateway:audit", audit_endpoint(services)), methods=["GET"]),
            Route(f"{V1}/explain", authorized(services, None, explain_endpoint(services), audit_as="gateway:explain"),
                  methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )
    # No slash redirect: Starlette would answer `/tokens/` with a 307 to `http://<client Host>/tokens`,
    # an absolute URL built from a request header. Nothing the gateway emits comes from the Host.
    app.router.redirect_slashes = False
    return app
