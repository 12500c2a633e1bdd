"""How an admin API endpoint runs: inside the request frame, authenticated, authorized, audited.

`authorized(services, action, handler)` wraps a handler: the caller's token must carry a grant
with scope `gateway` whose role the policy allows `action` (the shipped `token-admin`); with
`action=None` any valid token will do (attenuating or explaining one's own token). The handler
may add to the audit record (what it minted, revoked, ...).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.core.audit import AuditRecord
from gateway.core.tokens import Claims
from gateway.errors import Forbidden, GatewayError, error_body
from gateway.frame import RequestFrame, refuse_tokens_in_query
from gateway.services import Services

Handler = Callable[[Request, Claims, AuditRecord], Awaitable[Response]]


def open_frame(services: Services, request: Request, action: str) -> RequestFrame:
    return RequestFrame(services.audit, services.metrics, client_ip=request.client.host if request.client else "",
                        method=request.method, path=request.url.path, action=action)


def error_response(error: GatewayError, request_id: str) -> Response:
    return JSONResponse(error_body(error, request_id), status_code=error.status,
                        headers={**error.headers, "x-request-id": request_id})


def authorized(services: Services, action: str | None, handler: Handler, *,
               audit_as: str | None = None) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate, authorize `action` on the gateway (None: any valid token), run `handler`."""

    async def run(request: Request) -> Response:
        frame = open_frame(services, request, action or audit_as or "gateway:self")

        async def work() -> Response:
            refuse_tokens_in_query(request.scope.get("query_string", b""))
            claims = await services.authorizer.authenticate(
                [v.encode("latin-1") for v in request.headers.getlist("authorization")])
            frame.identify(claims)
            if action is not None:
                ruling = services.authorizer.decide_gateway(claims, action)
                if not ruling.allowed:
                    raise Forbidden(ruling.decision.reason)
                frame.record.reason = ruling.decision.reason
            response = await handler(request, claims, frame.record)
            frame.record.decision, frame.record.status = "allow", response.status_code
            response.headers["x-request-id"] = frame.request_id
            return response

        async def refuse(error: GatewayError) -> Response:
            return error_response(error, frame.request_id)

        return await frame.run(work, refuse)

    return run
