"""`POST /_gateway/v1/explain`: would this token (or grant set) be allowed METHOD PATH, and why.

A token explains itself: its own grants, or some of them (`grants` each within one of the
caller's, as attenuation would accept), or `token` being the very token it calls with. Any other
grant set or token is a token-admin's business (`gateway:explain`); anyone else gets a 403 naming
the grant or the field that is not theirs. The answer comes from the decision the request path
takes, body constraints included (surfaces/machines/explain.py).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.body import field, grants_field, json_object, unknown_fields
from gateway.api.endpoint import Handler
from gateway.core.audit import AuditRecord
from gateway.core.grants import Grant
from gateway.core.tokens import Claims
from gateway.errors import BadRequest, Forbidden, Unauthenticated, Unprocessable
from gateway.services import Services
from gateway.surfaces.machines.explain import explain

_ADMIN_ONLY = "explaining other grants or another token needs token-admin@gateway"


def explain_endpoint(services: Services) -> Handler:
    async def run(request: Request, claims: Claims, record: AuditRecord) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"method", "path", "body", "grants", "token"})
        method = field(body, "method", str, required=True)
        path = field(body, "path", str, required=True)
        request_body = body.get("body")
        raw_body = None if request_body is None else json.dumps(request_body).encode()
        grants, name, chain = await whose(services, claims, body)
        result = await explain(grants, method, path, raw_body, routes=services.machines.routes,
                               rules=services.authorizer.rules, environments=services.authorizer.environments,
                               org_slug=services.config.upstream_org_slug, token_name=name, chain=chain)
        return JSONResponse(result.to_json())

    return run


Chain = tuple[tuple[Grant, ...], ...]


async def whose(services: Services, claims: Claims, body: dict[str, Any]) -> tuple[tuple[Grant, ...], str, Chain]:
    """The grants to explain for, the token name the answer uses, and the ancestors' grants the
    answer is also decided under (a derived token's): the caller's own unless it asks for others,
    which only a token-admin may."""
    admin = services.authorizer.decide_gateway(claims, "gateway:explain").allowed
    if body.get("token") is not None and body.get("grants") is not None:
        raise BadRequest("give 'grants' or 'token', not both")
    if body.get("token") is not None:
        other = await _token(services, field(body, "token", str), admin=admin, caller=claims)
        return other.grants, other.name, other.chain
    if body.get("grants") is not None:
        asked = services.registry.validate_grants(grants_field(body))  # unknown roles: 400, did you mean
        if not admin:
            env_of = services.authorizer.environments.resolve
            for grant in asked:
                if not any(grant == held or grant.within(held, env_of) for held in claims.grants):
                    raise Forbidden(f"grant {grant} is not within your token's own grants "
                                    f"({', '.join(claims.grant_strings())}); {_ADMIN_ONLY}. Omit 'grants' to "
                                    "explain for your own token")
        return (asked, "explain", ()) if admin else (asked, claims.name, claims.chain)
    return claims.grants, claims.name, claims.chain


async def _token(services: Services, text: str, *, admin: bool, caller: Claims) -> Claims:
    """The token asked about, checked but not counted as used (asking is not using)."""
    try:
        other = services.authorizer.verifier.verify(text)
        if not admin and other.jti != caller.jti:
            raise _not_yours()
        await services.registry.check(other, use=False)
    except Unauthenticated as exc:
        if not admin:
            # Not provably the caller's own: the same refusal as for any other token, word for word.
            raise _not_yours() from None
        # The token asked about is the request's data, not the caller's credential.
        raise Unprocessable(f"field 'token': {exc.message}") from None
    return other


def _not_yours() -> Forbidden:
    return Forbidden(f"field 'token' is not the token you call with; {_ADMIN_ONLY}. Omit 'token' to explain for "
                     "your own token")
