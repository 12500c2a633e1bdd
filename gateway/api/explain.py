"""`POST /_gateway/v1/explain`: would this token (or grant set) be allowed METHOD PATH, and why.

A token explains itself; explaining another token or a grant set is a token-admin's business.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.body import field, grants_field, json_object, unknown_fields
from gateway.api.endpoint import Handler
from gateway.core.audit import AuditRecord
from gateway.core.grants import GrantError, parse_grants
from gateway.core.tokens import Claims
from gateway.errors import BadRequest, Forbidden, Unauthenticated, Unprocessable
from gateway.services import Services
from gateway.surfaces.machines.explain import explain


def explain_endpoint(services: Services) -> Handler:
    async def run(request: Request, claims: Claims, record: AuditRecord) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"method", "path", "body", "grants", "token"})
        method = field(body, "method", str, required=True)
        path = field(body, "path", str, required=True)
        request_body = body.get("body")
        raw_body = None if request_body is None else json.dumps(request_body).encode()
        grants, name = claims.grants, claims.name
        if body.get("grants") is not None or body.get("token") is not None:
            if not services.authorizer.decide_gateway(claims, "gateway:explain").allowed:
                raise Forbidden("explaining another token or grant set needs token-admin@gateway; "
                                "omit 'grants' and 'token' to explain for your own token")
            if body.get("token") is not None:
                try:
                    other = services.authorizer.verifier.verify(field(body, "token", str))
                    await services.registry.check(other)
                except Unauthenticated as exc:
                    # The token asked about is the request's data, not the caller's credential.
                    raise Unprocessable(f"field 'token': {exc.message}") from None
                grants, name = other.grants, other.name
            else:
                try:
                    grants, name = parse_grants(grants_field(body)), "explain"
                except GrantError as exc:
                    raise BadRequest(str(exc)) from None
        result = await explain(grants, method, path, raw_body, routes=services.machines.routes,
                               rules=services.authorizer.rules, environments=services.authorizer.environments,
                               token_name=name)
        return JSONResponse(result.to_json())

    return run
