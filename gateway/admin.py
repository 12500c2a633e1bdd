"""The gateway's own HTTP API under `/_gateway/` (DESIGN section 8): never forwarded.

Token administration is authorized like any request: the caller's token must carry a grant
with scope `gateway` whose role the policy allows the `gateway:*` action (the shipped
`token-admin`). Attenuation needs only a valid token (the caller narrows its own), and explain
is open to token-admins and to a token asking about itself. Every operation is audited.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.openapi import admin_openapi
from gateway.core.audit import new_record
from gateway.core.grants import GrantError, parse_grants
from gateway.core.policy import decide
from gateway.core.registry import MintedToken
from gateway.core.tokens import Claims
from gateway.durations import parse_duration
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    NotFound,
    Unauthenticated,
    Unprocessable,
    error_body,
)
from gateway.oidc.exchange import exchange_endpoint
from gateway.state import GatewayState
from gateway.surfaces.machines.explain import explain

MAX_ADMIN_BODY = 64 * 1024
Handler = Callable[[Request, Claims, dict[str, Any]], Awaitable[Response]]


class AdminContext:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def endpoint(self, action: str | None, handler: Handler, *,
                 audit_as: str | None = None) -> Callable[[Request], Awaitable[Response]]:
        """Authenticate, authorize `action` on the gateway (None: any valid token), run, audit."""

        async def run(request: Request) -> Response:
            started = time.perf_counter()
            request_id = uuid.uuid4().hex
            record = new_record(request_id, client_ip=request.client.host if request.client else "",
                                method=request.method, path=request.url.path, action=action or audit_as)
            try:
                if b"sgt_" in request.url.query.encode() or "access_token" in request.query_params:
                    raise BadRequest("tokens in the query string are refused; send 'Authorization: Bearer sgt_...'")
                claims = await self.state.authenticate(
                    [v.encode("latin-1") for v in request.headers.getlist("authorization")])
                record.update(jti=claims.jti, sub=claims.sub, token_name=claims.name)
                if action is not None:
                    decision = decide(claims.grants, self.state.policy, app=None, env=None, action=action,
                                      token_name=claims.name, gateway_target=True)
                    if not decision.allowed:
                        raise Forbidden(decision.reason)
                    record["reason"] = decision.reason
                response = await handler(request, claims, record)
                record.update(decision="allow", status=response.status_code)
                response.headers["x-request-id"] = request_id
                return response
            except GatewayError as error:
                record.update(status=error.status, decision="deny", reason=f"{error.code}: {error.message}")
                return JSONResponse(error_body(error, request_id), status_code=error.status,
                                    headers={**error.headers, "x-request-id": request_id})
            finally:
                duration = time.perf_counter() - started
                record["duration_ms"] = round(duration * 1000, 3)
                self.state.audit.emit(record)
                self.state.metrics.observe(record["decision"], action or "gateway:self", record["status"],
                                           duration, None)

        return run


async def json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY:
        raise BadRequest(f"request body is larger than {MAX_ADMIN_BODY} bytes")
    if not raw:
        return {}
    try:
        document = json.loads(raw)
    except ValueError:
        raise BadRequest("request body is not valid JSON; send a JSON object") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    for key, value in document.items():
        _check_text(value, key)
    return document


def _check_text(value: Any, where: str) -> None:
    # JSON can spell lone surrogates (\ud800) that no store, log or upstream can encode.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"field '{where}' contains text that is not valid Unicode") from None
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}")


def field(document: dict[str, Any], name: str, kind: type, *, required: bool = False) -> Any:
    if name not in document or document[name] is None:
        if required:
            raise BadRequest(f"field '{name}' is required")
        return None
    value = document[name]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise BadRequest(f"field '{name}' must be {'a string' if kind is str else kind.__name__}")
    return value


def duration_field(document: dict[str, Any], name: str, *, allow_zero: bool = False) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRequest(f"field '{name}' must be a duration like \"15m\", \"1h\", \"30d\" or whole seconds")
    try:
        return parse_duration(value, allow_zero=allow_zero)
    except ValueError as exc:
        raise BadRequest(f"field '{name}': {exc}") from None


def grants_field(document: dict[str, Any]) -> list[str]:
    grants = document.get("grants")
    if not isinstance(grants, list) or not grants or not all(isinstance(g, str) for g in grants):
        raise BadRequest("field 'grants' must be a non-empty list of strings like \"deployer@app:web-staging\"")
    return grants


def unknown_fields(document: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(document) - allowed)
    if extra:
        raise BadRequest(f"unknown field(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def minted_json(minted: MintedToken) -> dict[str, Any]:
    return {"token": minted.token, **minted.record.to_json()}


def create_admin_app(state: GatewayState) -> Starlette:
    ctx = AdminContext(state)

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

    async def metrics(request: Request) -> Response:
        state.metrics.decision_cache_hits.set(state.policy.cache_hits)
        state.metrics.token_cache_hits.set(state.verifier.cache_hits)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(admin_openapi())

    async def mint(request: Request, claims: Claims, record: dict[str, Any]) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"grants", "ttl", "name", "subject"})
        minted = await state.registry.mint(
            grants=grants_field(body), ttl_s=duration_field(body, "ttl"),
            name=field(body, "name", str) or "api-token", subject=field(body, "subject", str) or f"api:{claims.sub}")
        record["reason"] = f"minted {minted.record.jti} ({', '.join(minted.record.grants)})"
        return JSONResponse(minted_json(minted), status_code=201)

    async def list_tokens(request: Request, claims: Claims, record: dict[str, Any]) -> Response:
        active = request.query_params.get("active", "").lower() in ("1", "true", "yes")
        records = await state.store.records()
        if active:
            now = int(time.time())
            records = [r for r in records if r.revoked_at is None and r.exp > now]
        return JSONResponse({"tokens": [r.to_json() for r in records]})

    async def show(request: Request, claims: Claims, record: dict[str, Any]) -> Response:
        return JSONResponse((await state.registry.show(request.path_params["jti"])).to_json())

    async def revoke(request: Request, claims: Claims, record: dict[str, Any]) -> Response:
        jti = request.path_params["jti"]
        revoked = await state.registry.revoke(jti, reason=request.query_params.get("reason"))
        record["reason"] = f"revoked {', '.join(revoked) or 'nothing (already revoked)'}"
        return Response(status_code=204)

    async def rotate(request: Request, claims: Claims, record: dict[str, Any]) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"grace"})
        grace = duration_field(body, "grace", allow_zero=True)
        minted = await state.registry.rotate(request.path_params["jti"], grace_s=3600 if grace is None else grace)
        record["reason"] = f"rotated {request.path_params['jti']} -> {minted.record.jti}"
        return JSONResponse(minted_json(minted), status_code=201)

    async def attenuate(request: Request, claims: Claims, record: dict[str, Any]) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"grants", "ttl", "name"})
        minted = await state.registry.attenuate(
            claims, grants=grants_field(body), ttl_s=duration_field(body, "ttl"), name=field(body, "name", str),
            env_of=state.environments.resolve)
        record["reason"] = f"attenuated {claims.jti} -> {minted.record.jti}"
        return JSONResponse(minted_json(minted), status_code=201)

    async def explain_endpoint(request: Request, claims: Claims, record: dict[str, Any]) -> Response:
        body = await json_object(request)
        unknown_fields(body, {"method", "path", "body", "grants", "token"})
        method = field(body, "method", str, required=True)
        path = field(body, "path", str, required=True)
        request_body = body.get("body")
        raw_body = None if request_body is None else json.dumps(request_body).encode()
        grants, name = claims.grants, claims.name
        if body.get("grants") is not None or body.get("token") is not None:
            # Explaining for someone else is a token-admin's business.
            decision = decide(claims.grants, state.policy, app=None, env=None, action="gateway:explain",
                              token_name=claims.name, gateway_target=True)
            if not decision.allowed:
                raise Forbidden("explaining another token or grant set needs token-admin@gateway; "
                                "omit 'grants' and 'token' to explain for your own token")
            if body.get("token") is not None:
                try:
                    other = state.verifier.verify(field(body, "token", str))
                    await state.registry.check(other)
                except Unauthenticated as exc:
                    # The token asked about is the request's data, not the caller's credential.
                    raise Unprocessable(f"field 'token': {exc.message}") from None
                grants, name = other.grants, other.name
            else:
                try:
                    grants, name = parse_grants(grants_field(body)), "explain"
                except GrantError as exc:
                    raise BadRequest(str(exc)) from None
        result = explain(grants, method, path, raw_body, routes=state.routes, policy=state.policy,
                         environments=state.environments, token_name=name)
        return JSONResponse(result.to_json())

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        error = NotFound(f"{request.method} {request.url.path} is not an endpoint of the gateway")
        return JSONResponse(error_body(error, ""), status_code=404)

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        error = BadRequest(f"{request.method} is not allowed on {request.url.path}")
        error.status, error.code = 405, "method_not_allowed"
        return JSONResponse(error_body(error, ""), status_code=405)

    v1 = "/_gateway/v1"
    return Starlette(
        routes=[
            Route("/_gateway/healthz", healthz, methods=["GET"]),
            Route("/_gateway/readyz", readyz, methods=["GET"]),
            Route("/_gateway/metrics", metrics, methods=["GET"]),
            Route("/.well-known/jwks.json", jwks, methods=["GET"]),
            Route(f"{v1}/openapi.json", openapi, methods=["GET"]),
            Route(f"{v1}/tokens", ctx.endpoint("gateway:mint", mint), methods=["POST"]),
            Route(f"{v1}/tokens", ctx.endpoint("gateway:list", list_tokens), methods=["GET"]),
            Route(f"{v1}/tokens/{{jti}}", ctx.endpoint("gateway:show", show), methods=["GET"]),
            Route(f"{v1}/tokens/{{jti}}", ctx.endpoint("gateway:revoke", revoke), methods=["DELETE"]),
            Route(f"{v1}/tokens/{{jti}}/rotate", ctx.endpoint("gateway:rotate", rotate), methods=["POST"]),
            Route(f"{v1}/token/attenuate", ctx.endpoint(None, attenuate, audit_as="gateway:attenuate"),
                  methods=["POST"]),
            # RFC 8693, form-encoded; the subject token is the credential, so no bearer auth (audited inside).
            Route(f"{v1}/token/exchange", exchange_endpoint(state), methods=["POST"]),
            Route(f"{v1}/explain", ctx.endpoint(None, explain_endpoint, audit_as="gateway:explain"), methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )
