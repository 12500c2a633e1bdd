"""Token administration: mint, list, show, revoke, rotate (token-admins); attenuate and self (any token)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.body import duration_field, field, grants_field, json_object, minted_json, unknown_fields
from gateway.core.audit import AuditRecord
from gateway.core.token_query import FILTER_KEYS, TokenFilter, abilities, select, state_of
from gateway.core.tokens import Claims
from gateway.errors import BadRequest
from gateway.services import Services

LIST_PARAMETERS = {"active", *FILTER_KEYS}


class TokenEndpoints:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def mint(self, request: Request, claims: Claims, record: AuditRecord) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"grants", "ttl", "name", "subject"})
        minted = await self.services.registry.mint(
            grants=grants_field(body), ttl_s=duration_field(body, "ttl"),
            name=field(body, "name", str) or "api-token", subject=field(body, "subject", str) or f"api:{claims.sub}")
        record.reason = f"minted {minted.record.jti} ({', '.join(minted.record.grants)})"
        return JSONResponse(minted_json(minted), status_code=201)

    async def list(self, request: Request, claims: Claims, record: AuditRecord) -> Response:
        params = request.query_params
        unknown = sorted(set(params) - LIST_PARAMETERS)
        if unknown:
            # A filter this gateway does not know must not be ignored: the caller would take the
            # whole list for the filtered one.
            raise BadRequest(f"unknown query parameter(s) {', '.join(unknown)}; the list takes "
                             f"{', '.join(sorted(LIST_PARAMETERS))}")
        given = {key: params[key] for key in FILTER_KEYS if key in params}
        if (params.get("active", "").lower() in ("1", "true", "yes")
                and given.setdefault("state", "active") != "active"):
            raise BadRequest("active=true and state= disagree; give one of them")
        try:
            wanted = TokenFilter(**given)
        except ValueError as exc:
            raise BadRequest(f"query parameter {exc}") from None
        records = select(await self.services.store.records(), wanted, env_of=self.services.authorizer.environment,
                         now=int(time.time()))
        return JSONResponse({"tokens": [r.to_json() for r in records], "filters": wanted.given()})

    async def show(self, request: Request, claims: Claims, record: AuditRecord) -> Response:
        return JSONResponse((await self.services.registry.show(request.path_params["jti"])).to_json())

    async def revoke(self, request: Request, claims: Claims, record: AuditRecord) -> Response:
        jti = request.path_params["jti"]
        revoked = await self.services.registry.revoke(jti, reason=request.query_params.get("reason"))
        record.reason = f"revoked {', '.join(revoked) or 'nothing (already revoked)'}"
        return Response(status_code=204)

    async def rotate(self, request: Request, claims: Claims, record: AuditRecord) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"grace"})
        grace = duration_field(body, "grace", allow_zero=True)
        jti = request.path_params["jti"]
        minted = await self.services.registry.rotate(jti, grace_s=3600 if grace is None else grace)
        record.reason = f"rotated {jti} -> {minted.record.jti}"
        return JSONResponse(minted_json(minted), status_code=201)

    async def attenuate(self, request: Request, claims: Claims, record: AuditRecord) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"grants", "ttl", "name"})
        minted = await self.services.registry.attenuate(
            claims, grants=grants_field(body), ttl_s=duration_field(body, "ttl"), name=field(body, "name", str),
            env_of=self.services.authorizer.environment)
        record.reason = f"attenuated {claims.jti} -> {minted.record.jti}"
        return JSONResponse(minted_json(minted), status_code=201)

    async def own(self, request: Request, claims: Claims, record: AuditRecord) -> Response:
        """The caller's own token: its record and what its grants may do (never the token itself)."""
        own = await self.services.registry.show(claims.jti)
        may = abilities(claims.grants, self.services.authorizer.rules.policy,
                        env_of=self.services.authorizer.environment,
                        environments=self.services.config.environment_names)
        return JSONResponse({**own.to_json(), "state": state_of(own, int(time.time())), "may": may})
