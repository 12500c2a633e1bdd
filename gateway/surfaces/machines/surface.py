"""The Machines API surface: canonicalize → authenticate → resolve → decide → rate-limit → forward → audit.

`MachinesSurface.handle` is the request path of DESIGN section 2 for `/v1/...`, top to bottom.
Fail closed: any exception before the upstream call becomes an error response and nothing is
forwarded; the request frame (gateway/frame.py) writes the audit record, allowed or denied. A
body is read whole and judged (bodies.py) before the upstream call, and the upstream gets only
the client headers on `forwarded_headers`.

A request line that repeats (same method and target) skips the parsing it already passed
(request_lines.py), and a token that repeats it gets the decision it got the first time
(core/decision_cache.py); every other step runs on every request: the token's signature and
registration, the Host and length checks, the rate limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.core.audit import AuditLog
from gateway.core.authorizer import Authorizer, Ruling
from gateway.core.constraints import enforce
from gateway.core.tokens import Claims
from gateway.errors import Forbidden, GatewayError
from gateway.frame import RequestFrame, refuse_tokens_in_query
from gateway.metrics import GatewayMetrics
from gateway.surfaces import SurfaceLoad
from gateway.surfaces.http import (
    FLYCTL_HEADERS,
    RequestHeaders,
    Scope,
    client_ip,
    keep_headers,
    printable,
    read_body,
    relay,
    request_target,
    send_error,
    send_json,
)
from gateway.surfaces.machines.bodies import check_placement, read_document, refuse_unexpected_body
from gateway.surfaces.machines.listing import LISTING_LIMIT, filter_app_listing
from gateway.surfaces.machines.ownership import volume_ownership
from gateway.surfaces.machines.request_lines import RequestLine, RequestLineCache
from gateway.surfaces.paths import Target, canonicalize
from gateway.surfaces.routes import RouteTable, resolve_request
from gateway.upstream.attenuation import Attenuator
from gateway.upstream.client import UpstreamClient, ms_since

# Request headers forwarded to the Machines API (SECURITY.md): flyctl's, and the lease nonce.
MACHINES_HEADERS = FLYCTL_HEADERS | {b"fly-machine-lease-nonce"}


class MachinesSurface:
    name = "machines"
    prefixes: tuple[str, ...] = ("",)
    forwarded_headers: frozenset[bytes] = MACHINES_HEADERS

    def __init__(self, route_files: list[Path], *, authorizer: Authorizer, upstream: UpstreamClient,
                 audit: AuditLog, metrics: GatewayMetrics, max_body_bytes: int, org_slug: str | None,
                 attenuator: Attenuator | None = None) -> None:
        self.route_files = route_files
        self.org_slug = org_slug
        self.attenuator = attenuator  # upstream.attenuate: apps
        self.authorizer = authorizer
        self.upstream = upstream
        self.audit = audit
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.routes = RouteTable(())
        self.lines = RequestLineCache()

    def serves(self, path: str) -> bool:
        return True  # every path no other surface serves: unknown ones are refused as unknown_route

    def load(self) -> SurfaceLoad:
        routes = RouteTable.load(self.route_files)

        def install() -> None:
            self.routes = routes

        return SurfaceLoad(routes.produced_actions(), install)

    def ready(self) -> bool:
        return bool(self.routes.routes)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        raw_path, raw_query, has_query = request_target(scope)
        frame = RequestFrame(self.audit, self.metrics, client_ip=client_ip(scope), method=scope["method"],
                             path=printable(raw_path))

        async def refuse(error: GatewayError) -> None:
            await send_error(send, error, frame.request_id)

        await frame.run(self.handle(frame, scope, receive, send, raw_path, raw_query, has_query), refuse)

    async def handle(self, frame: RequestFrame, scope: Scope, receive: Any, send: Any, raw_path: bytes,
                     raw_query: bytes, has_query: bool) -> None:
        authorizer, record, method = self.authorizer, frame.record, scope["method"]
        # 1. canonicalize: one meaning per target, or a 400 (a known line passed this before).
        routes = self.routes
        line = self.lines.get(routes, authorizer.environments, method, raw_path, raw_query, has_query)
        target = line.target if line is not None else canonicalize(raw_path, raw_query, has_query=has_query)
        if len(raw_path) > 512:
            record.path = target.raw_path.decode("ascii")
        headers = RequestHeaders(scope["headers"])
        # 2. authenticate: a valid, registered, unrevoked token, never one from the query string.
        claims = await self.authenticate(headers, target)
        frame.identify(claims)
        # 3. resolve: route, app, action, environment (the body is read only where it names the app).
        if line is None or self.routes is not routes:
            line, body = await self.resolve(scope, method, target, record.path, receive)
        else:
            body = None
        check = line.check
        record.action, record.app, record.env = check.action, check.app, check.env
        headers.check_declared_length(self.max_body_bytes)
        route = line.resolved.route
        refuse_unexpected_body(route, headers.has_body)
        if route.answer_gateway:
            # About the caller's own token, which it already holds: no grant needed, nothing forwarded.
            record.decision, record.status = "allow", 200
            record.reason = "answered by the gateway about the caller's token"
            await send_json(send, 200, describe_token(claims), frame.request_id)
            return
        # 4. decide: grants ∩ policy, then the body and its constraints; a repeated request line
        # gets the decision this token got for it before.
        cached = authorizer.cached(claims, line)
        ruling = None
        if cached is not None:
            frame.allow(cached.decision.reason)
            record.who, record.what = cached.who, cached.what
        else:
            ruling = authorizer.decide(claims, [check])
            if not ruling.allowed:
                raise Forbidden(ruling.decision.reason)
        # The body is read whole (never streamed): the upstream sees nothing until all of it arrived
        # and was judged, so a body that stalls or breaks the limit is refused with nothing forwarded.
        if body is None and headers.has_body:
            body = await read_body(receive, self.max_body_bytes)
        constrained = await self.judge_body(ruling, line, body, frame.request_id)
        if ruling is not None:
            frame.allow(ruling.decision.reason)
            if line.cacheable and not constrained:
                authorizer.remember(claims, line, ruling, record)
        # 5. rate-limit, 6. forward (7. audit: the frame, whatever happened).
        await authorizer.rate_limit(claims)
        record.status = await self.forward(scope, send, frame, target, line, claims, body)

    async def authenticate(self, headers: RequestHeaders, target: Target) -> Claims:
        refuse_tokens_in_query(target.raw_query)
        return await self.authorizer.authenticate(headers.authorization)

    async def resolve(self, scope: Scope, method: str, target: Target, path: str,
                      receive: Any) -> tuple[RequestLine, bytes | None]:
        routes = self.routes
        match = routes.resolve(method, target.path)
        body = await read_body(receive, self.max_body_bytes) if match.route.needs_body else None
        resolved = resolve_request(match, target.raw_query, body)
        check = self.authorizer.check(resolved.action, resolved.app, org_filtered=resolved.route.filter_apps)
        line = RequestLine(method, target, path, resolved, check)
        self.lines.put(routes, self.authorizer.environments, line)
        return line, body

    async def judge_body(self, ruling: Ruling | None, line: RequestLine, body: bytes | None,
                         request_id: str) -> bool:
        """Checks the body (bodies.py: strict JSON, its placement, and where constraints apply only
        fields they can judge, then the constraints); says whether any constraint applied. A cached
        decision (`ruling` None) had none."""
        constraints = self.authorizer.constraints(ruling, line.check) if ruling is not None else ()
        document = read_document(line.resolved.route, body, judged=bool(constraints)) if body else None
        check_placement(document, self.org_slug)
        if not constraints:
            return False
        assert line.check.app is not None  # constraints apply to app-level checks only
        await enforce(constraints, app=line.check.app, document={} if document is None else document,
                      ownership=volume_ownership(self.upstream, request_id))
        return True

    async def forward(self, scope: Scope, send: Any, frame: RequestFrame, target: Target, line: RequestLine,
                      claims: Claims, body: bytes | None) -> int:
        record = frame.record
        headers = await self.outgoing_headers(scope, frame, body, line)
        if line.resolved.route.filter_apps:
            headers.popall("Accept-Encoding", None)  # the gateway reads this answer: it must be plain
        frame.forwarding()
        response = await self.upstream.send(scope["method"], target.forward_target, headers, body)
        try:
            if line.resolved.route.filter_apps and 200 <= response.status < 300:
                listing = await response.read_all(LISTING_LIMIT)
                record.upstream_ms = ms_since(response.started)
                filtered = filter_app_listing(listing, claims, self.authorizer)
                await send_json(send, 200, filtered, frame.request_id, extra=keep_headers(response.headers))
                return 200
            if response.status in (401, 403) and self.attenuator is not None:
                self.attenuator.forget(line.check.app)  # its numeric id may be stale
            await relay(send, response, frame.request_id)
            record.upstream_ms = ms_since(response.started)
            return response.status
        finally:
            response.release()


    async def outgoing_headers(self, scope: Scope, frame: RequestFrame, body: bytes | None, line: RequestLine) -> Any:
        """`upstream_headers`, with the credential narrowed to this request when attenuation is on."""
        headers = self.upstream_headers(scope, frame, body)
        if self.attenuator is not None:
            headers["Authorization"] = await self.attenuator.authorization(line.check.app, line.check.action,
                                                                           frame.request_id)
        return headers

    def upstream_headers(self, scope: Scope, frame: RequestFrame, body: bytes | None) -> Any:
        """The headers the upstream gets: the client's that this surface forwards (`forwarded_headers`),
        the upstream credential and the gateway's own forwarding headers; a body, which the gateway
        read as JSON, goes as JSON (aiohttp writes its Content-Length from the bytes)."""
        headers = self.upstream.build_headers(scope["headers"], allowed=self.forwarded_headers,
                                              client_ip=frame.record.client_ip, scheme=scope.get("scheme", "http"),
                                              request_id=frame.request_id)
        if body is not None:
            headers["Content-Type"] = "application/json"
        return headers


def describe_token(claims: Claims) -> dict[str, Any]:
    return {"source": "scopegate", "jti": claims.jti, "sub": claims.sub, "name": claims.name,
            "grants": claims.grant_strings(), "iat": claims.iat, "exp": claims.exp, "parent": claims.parent}
