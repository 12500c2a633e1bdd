"""The request path: canonicalize → authenticate → resolve → decide → rate-limit → forward → audit.

`Proxy.__call__` is the ASGI callable for every request that is not the gateway's own API. It
reads top to bottom as the checklist of DESIGN section 2. Fail closed: any exception before
the upstream call becomes an error response and nothing is forwarded; the audit record is
written in `finally`, allowed or denied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote_to_bytes

from gateway.core.audit import new_record
from gateway.core.constraints import VolumeOwnership, enforce
from gateway.core.grants import Grant
from gateway.core.policy import decide
from gateway.core.tokens import Claims
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    RequestTimeout,
    StateUnavailable,
    TooLarge,
    Unauthenticated,
    error_body,
)
from gateway.plans import Allowed, AllowedCache, Plan, PlanCache
from gateway.state import GatewayState
from gateway.surfaces.paths import Target, canonicalize
from gateway.surfaces.routes import Resolved, resolve_request
from gateway.upstream.client import UpstreamResponse

log = logging.getLogger("scopegate")

Scope = dict[str, Any]
Message = dict[str, Any]
_LISTING_LIMIT = 32 * 1024 * 1024
BODY_IDLE_TIMEOUT_S = 5.0
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class Proxy:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.plans = PlanCache()
        self.allowed = AllowedCache(self.plans)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        raw_path, raw_query = request_target(scope)
        # The path is filled in once the target is canonical; a request refused before that is
        # recorded with the raw target made printable (`_expand`).
        record = new_record(request_id, client_ip=(scope.get("client") or ("", 0))[0], method=scope["method"],
                            path="")
        try:
            await self.handle(scope, receive, send, record, request_id, raw_path, raw_query)
        except GatewayError as error:
            _expand(record, raw_path)
            record.update(status=error.status, decision="deny", reason=error.code + ": " + error.message)
            if isinstance(error, StateUnavailable):
                self.state.metrics.store_errors.inc()
            await send_error(send, error, request_id)
        except Exception as exc:  # fail closed on anything unforeseen, and say nothing of it
            _expand(record, raw_path)
            log.exception("request %s failed: %s", request_id, exc.__class__.__name__)
            record.update(status=500, decision="deny", reason="internal_error")
            await send_error(send, GatewayError("the gateway failed on this request; it was not forwarded"),
                             request_id)
        finally:
            duration = time.perf_counter() - started
            upstream_ms = record["upstream_ms"]
            allowed: Allowed | None = record.get("_allowed")
            if allowed is not None:  # forwarded on a cached decision: the record from its fragments
                self.state.audit.emit_allowed(request_id, allowed.who, record["client_ip"], allowed.what,
                                              record["status"], upstream_ms, round(duration * 1000, 3))
                action: str | None = allowed.plan.resolved.action
            else:
                record["duration_ms"] = round(duration * 1000, 3)
                self.state.audit.emit(record)
                action = record["action"]
            self.state.metrics.observe(record["decision"], action, record["status"], duration,
                                       None if upstream_ms is None else upstream_ms / 1000)

    async def handle(self, scope: Scope, receive: Any, send: Any, record: dict[str, Any], request_id: str,
                     raw_path: bytes, raw_query: bytes) -> None:
        state = self.state
        method = scope["method"]
        plan = self.plans.get(state, method, raw_path, raw_query)
        target = canonicalize(raw_path, raw_query) if plan is None else plan.target
        headers = RequestHeaders(scope["headers"])
        record["path"] = target.raw_path.decode("ascii") if plan is None else plan.path
        claims = await self.authenticate(headers.authorization, target)
        if plan is not None and not self.plans.current(state):
            plan = None  # the routes were reloaded while the token was checked: resolve anew
        if plan is not None:
            allowed = self.allowed.get(state, claims, plan)
            if allowed is not None:
                # The same checks as below, with the decision this token got for this plan.
                record["_allowed"] = allowed
                headers.check_declared_length(state.max_body_bytes)
                record["decision"] = "allow"
                await state.limiter.check(claims.jti, claims.name)
                record["status"] = await self.forward(scope, receive, send, target, plan.resolved, claims, None,
                                                      headers.has_body, request_id, record)
                return
        record.update(jti=claims.jti, sub=claims.sub, token_name=claims.name)
        body: bytes | None = None
        if plan is None:
            match = state.routes.resolve(method, target.path)
            if match.route.needs_body:
                body = await read_body(receive, state.max_body_bytes)
            headers.check_declared_length(state.max_body_bytes)
            resolved = resolve_request(match, target.raw_query, body)
            env = state.environments.resolve(resolved.app) if resolved.app is not None else None
            if not match.route.needs_body:
                plan = Plan(method, target, record["path"], resolved, env)
                self.plans.put(state, plan)
            record.update(action=resolved.action, app=resolved.app, env=env)
        else:
            resolved, env = plan.resolved, plan.env
            record.update(action=resolved.action, app=resolved.app, env=env)
            headers.check_declared_length(state.max_body_bytes)
        if resolved.route.answer_gateway:
            # About the caller's own token, which it already holds: no grant needed, nothing forwarded.
            record.update(status=200, decision="allow", reason="answered by the gateway about the caller's token")
            await send_json(send, 200, describe_token(claims), request_id)
            return
        decision = decide(claims.grants, state.policy, app=resolved.app, env=env, action=resolved.action,
                          token_name=claims.name, org_filtered=resolved.route.filter_apps)
        if not decision.allowed:
            raise Forbidden(decision.reason)
        constraints = None
        if decision.grant is not None and resolved.app is not None and env is not None:
            constraints = state.constraints.applicable(decision.grant.role, env, resolved.action)
            if constraints:
                if body is None:
                    body = await read_body(receive, state.max_body_bytes)
                await enforce(constraints, app=resolved.app, body=body, ownership=self.ownership(request_id))
        if plan is not None and not constraints:
            self.allowed.put(state, claims, plan, decision)
        await state.limiter.check(claims.jti, claims.name)
        record.update(decision="allow", reason=decision.reason)
        record["status"] = await self.forward(scope, receive, send, target, resolved, claims, body,
                                              headers.has_body, request_id, record)

    def ownership(self, request_id: str) -> VolumeOwnership:
        """Asks the upstream whether a volume or snapshot belongs to an app (for constraints)."""
        upstream = self.state.upstream

        async def volume_of(app: str, volume: str) -> bool:
            if not _SAFE_ID.fullmatch(volume):
                return False
            status, document = await upstream.get_json(f"/v1/apps/{app}/volumes/{volume}", request_id)
            return status == 200 and isinstance(document, dict) and document.get("id") == volume

        async def snapshot_of(app: str, snapshot: str) -> bool:
            if not _SAFE_ID.fullmatch(snapshot):
                return False
            status, volumes = await upstream.get_json(f"/v1/apps/{app}/volumes", request_id)
            if status != 200 or not isinstance(volumes, list):
                return False
            for volume in volumes:
                volume_id = volume.get("id") if isinstance(volume, dict) else None
                if not isinstance(volume_id, str) or not _SAFE_ID.fullmatch(volume_id):
                    continue
                status, snapshots = await upstream.get_json(f"/v1/apps/{app}/volumes/{volume_id}/snapshots",
                                                            request_id)
                if status == 200 and isinstance(snapshots, list) and any(
                        isinstance(item, dict) and item.get("id") == snapshot for item in snapshots):
                    return True
            return False

        return VolumeOwnership(volume_of, snapshot_of)

    async def authenticate(self, authorization: list[bytes], target: Target) -> Claims:
        if target.raw_query:
            query = unquote_to_bytes(target.raw_query).lower()
            if b"sgt_" in query or b"access_token" in query:
                raise Unauthenticated("tokens in the query string are refused; send 'Authorization: Bearer sgt_...'")
        return await self.state.authenticate(authorization)

    async def forward(self, scope: Scope, receive: Any, send: Any, target: Target, resolved: Resolved,
                      claims: Claims, body: bytes | None, has_body: bool, request_id: str,
                      record: dict[str, Any]) -> int:
        state = self.state
        headers = state.upstream.build_headers(
            scope["headers"], client_ip=record["client_ip"], scheme=scope.get("scheme", "http"),
            request_id=request_id)
        payload: bytes | AsyncIterator[bytes] | None = body
        stream = None
        if body is None and has_body:
            stream = BodyStream(receive, state.max_body_bytes)
            payload = stream.chunks()
        try:
            response = await state.upstream.send(scope["method"], target.forward_target, headers, payload)
        except GatewayError:
            # The client's body broke the limit or the connection mid-stream; the upstream got a
            # truncated request it will not act on. Say what happened on the client's side.
            if stream is not None and stream.error is not None:
                raise stream.error from None
            raise
        try:
            if resolved.route.filter_apps and 200 <= response.status < 300:
                listing = await response.read_all(_LISTING_LIMIT)
                record["upstream_ms"] = _ms_since(response.started)
                filtered = filter_app_listing(listing, claims.grants, state)
                await send_json(send, 200, filtered, request_id, extra=_keep_headers(response.headers))
                return 200
            await relay(send, response, request_id)
            record["upstream_ms"] = _ms_since(response.started)
            return response.status
        finally:
            response.release()


def filter_app_listing(listing: bytes, grants: tuple[Grant, ...], state: GatewayState) -> dict[str, Any]:
    """The upstream's app list cut down to the apps the token may read; never the unfiltered list."""
    try:
        document = json.loads(listing)
        apps = document["apps"]
        if not isinstance(apps, list):
            raise TypeError("apps is not a list")
    except (ValueError, KeyError, TypeError):
        raise GatewayError("the upstream app list has an unexpected shape; it cannot be filtered, so it is withheld") \
            from None
    kept = []
    for item in apps:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        env = state.environments.resolve(name)
        if decide(grants, state.policy, app=name, env=env, action="apps:read", token_name="").allowed:
            kept.append(item)
    document["apps"] = kept
    if "total_apps" in document:
        document["total_apps"] = len(kept)
    return dict(document)


def describe_token(claims: Claims) -> dict[str, Any]:
    return {"source": "scopegate", "jti": claims.jti, "sub": claims.sub, "name": claims.name,
            "grants": claims.grant_strings(), "iat": claims.iat, "exp": claims.exp, "parent": claims.parent}


def request_target(scope: Scope) -> tuple[bytes, bytes]:
    """(raw path, raw query) as received. The request line's own target when the server gives it
    (server.py), which keeps what uvicorn would drop (absolute form, a fragment after the query)."""
    extension = scope.get("extensions", {}).get("scopegate.request_target")
    if isinstance(extension, bytes):
        path, _, query = extension.partition(b"?")
        return path, query
    raw = scope.get("raw_path")
    path = raw if isinstance(raw, bytes) else scope["path"].encode("utf-8")
    return path, scope.get("query_string", b"")


class RequestHeaders:
    """What the request path needs from the client's headers, in one pass over them."""

    __slots__ = ("authorization", "has_body", "lengths")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.authorization: list[bytes] = []
        self.lengths: list[bytes] = []  # Content-Length values
        hosts = 0
        chunked = False
        for name, value in headers:
            if name == b"authorization":
                self.authorization.append(value)
            elif name == b"host":
                hosts += 1
            elif name == b"content-length":
                self.lengths.append(value)
            elif name == b"transfer-encoding":
                chunked = True
        if hosts > 1:
            raise BadRequest("more than one Host header; send exactly one")
        self.has_body = chunked
        for value in self.lengths:
            if value != b"0":
                self.has_body = True

    def check_declared_length(self, limit: int) -> None:
        for value in self.lengths:
            if not value.isdigit():
                raise BadRequest("Content-Length is not a number")
            if int(value) > limit:
                raise TooLarge(f"request body is larger than limits.max_body_bytes ({limit} bytes)")


async def read_body(receive: Any, limit: int) -> bytes:
    body = bytearray()
    async for chunk in BodyStream(receive, limit).chunks():
        body += chunk
    return bytes(body)


class BodyStream:
    """The client's body as it arrives, cut off (with `error` set) past `limit` bytes."""

    def __init__(self, receive: Any, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.error: GatewayError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            try:
                message = await asyncio.wait_for(self.receive(), BODY_IDLE_TIMEOUT_S)
            except TimeoutError:
                self.error = RequestTimeout(f"the request body stalled for {BODY_IDLE_TIMEOUT_S:g}s; send it promptly")
                raise self.error from None
            if message["type"] == "http.disconnect":
                self.error = BadRequest("the client disconnected before sending the whole body")
                raise self.error
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                self.error = TooLarge(f"request body is larger than limits.max_body_bytes ({self.limit} bytes)")
                raise self.error
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


async def relay(send: Any, response: UpstreamResponse, request_id: str) -> None:
    headers = [*response.headers, (b"x-request-id", request_id.encode("ascii"))]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    async for chunk in response.chunks():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _keep_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type", b"content-encoding")]


async def send_json(send: Any, status: int, document: Any, request_id: str,
                    extra: list[tuple[bytes, bytes]] | None = None, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii")),
           (b"x-request-id", request_id.encode("ascii")), *(extra or [])]
    out += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Any, error: GatewayError, request_id: str) -> None:
    try:
        await send_json(send, error.status, error_body(error, request_id), request_id, headers=error.headers)
    except RuntimeError:
        # The response had already started (an upstream stream broke midway): nothing to add.
        log.warning("request %s: error after the response started: %s", request_id, error.code)


def _expand(record: dict[str, Any], raw_path: bytes) -> None:
    """The record of a failed request, complete for `emit`: the raw path (made printable) when
    the request failed before its target was canonical; and for a request that had a cached
    decision and failed later (rate limit, upstream), the fields its fragments would have carried."""
    if not record["path"]:
        record["path"] = _printable(raw_path)
    allowed: Allowed | None = record.pop("_allowed", None)
    if allowed is not None:
        claims, plan = allowed.claims, allowed.plan
        record.update(jti=claims.jti, sub=claims.sub, token_name=claims.name, action=plan.resolved.action,
                      app=plan.resolved.app, env=plan.env)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _printable(raw: bytes) -> str:
    return raw[:512].decode("ascii", errors="backslashreplace")
