"""Fly's REST API surface (`/api/v1/...`): organizations, builds, releases and logs, per app.

The request path is the Machines API's (a route map: canonicalize → authenticate → resolve →
decide → rate-limit → forward → audit, surfaces/machines/surface.py); what differs is resolving:

- `GET /api/v1/organizations/{slug}` (every `fly deploy` calls it) is an org-level read allowed only
  for the gateway's own organization (`upstream.org_slug`);
- `PATCH /api/v1/releases/{id}` names no app: the gateway remembers, in the store, the app of every
  release id an allowed `POST /api/v1/releases` answered with, and refuses ids it did not see;
- `POST /api/v1/builds/depot_builder` asks for a Depot builder: only one scoped to the app
  (`builder_scope: app`, flyctl's `--depot-scope=app`), never the organization's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gateway.core.audit import AuditLog
from gateway.core.authorizer import Authorizer
from gateway.core.jsonbody import load_strict
from gateway.core.tokens import Claims
from gateway.errors import BadRequest, Forbidden
from gateway.frame import RequestFrame
from gateway.metrics import GatewayMetrics
from gateway.store import TokenStore
from gateway.surfaces.http import FLYCTL_HEADERS, Scope, is_json, keep_headers, read_body
from gateway.surfaces.machines.request_lines import RequestLine
from gateway.surfaces.machines.surface import MachinesSurface
from gateway.surfaces.paths import Target
from gateway.upstream.attenuation import Attenuator
from gateway.upstream.client import UpstreamClient, ms_since

REMEMBER_S = 7 * 86400  # a release is reported on within minutes; a week is plenty
ANSWER_LIMIT = 4 * 1024 * 1024
PREFIX = "/api/v1/"


# Request headers forwarded to the REST API (SECURITY.md): flyctl's.
REST_HEADERS = FLYCTL_HEADERS


class RestSurface(MachinesSurface):
    name = "rest"
    prefixes: tuple[str, ...] = (PREFIX,)
    forwarded_headers: frozenset[bytes] = REST_HEADERS

    def __init__(self, route_files: list[Path], *, authorizer: Authorizer, upstream: UpstreamClient,
                 audit: AuditLog, metrics: GatewayMetrics, max_body_bytes: int, store: TokenStore,
                 org_slug: str | None, attenuator: Attenuator | None = None) -> None:
        super().__init__(route_files, authorizer=authorizer, upstream=upstream, audit=audit, metrics=metrics,
                         max_body_bytes=max_body_bytes, org_slug=org_slug, attenuator=attenuator)
        self.store = store

    def serves(self, path: str) -> bool:
        return path.startswith(PREFIX)

    async def resolve(self, scope: Scope, method: str, target: Target, path: str,
                      receive: Any) -> tuple[RequestLine, bytes | None]:
        line, body = await super().resolve(scope, method, target, path, receive)
        route = line.resolved.route
        document: dict[str, Any] = {}
        if method in ("POST", "PUT", "PATCH"):
            # Every body here is small JSON, read whole: checked with the exact keys a case-sensitive
            # upstream reads (never folded), and forwarded as read.
            if body is None:
                body = await read_body(receive, self.max_body_bytes)
            document = json_document(scope, body)
        if route.app_source in ("body", "lookup") and target.has_query:
            raise BadRequest(f"{method} {route.path} takes no query string (the app is named in the "
                             f"{'body' if route.app_source == 'body' else 'path'} only)")
        if route.app_source == "org":
            slug = self.routes.resolve(method, target.path).params[route.app_fields[0]]
            if self.org_slug is None or slug != self.org_slug:
                raise Forbidden(f"organization {slug!r} is not the one this gateway serves"
                                + (f" ({self.org_slug})" if self.org_slug else " (upstream.org_slug is not set)"))
        elif route.app_source == "lookup":
            release = self.routes.resolve(method, target.path).params[route.app_fields[0]]
            app = await self.store.recall(f"release:{release}")
            if app is None:
                raise Forbidden(f"release {release!r} was not created through this gateway; its app is unknown, "
                                "so it cannot be authorized")
            check = self.authorizer.check(line.resolved.action, app)
            line = RequestLine(line.method, line.target, line.path, line.resolved, check)  # never cached
        if "app_name" in document and document["app_name"] != line.check.app:
            raise BadRequest(f"the body names app {document['app_name']!r}, but this request is about "
                             f"{line.check.app or 'no app'}; leave app_name out or name that app")
        if route.operation == "Builds_depot_builder" and document.get("builder_scope") != "app":
            scope_name = document.get("builder_scope") or "organization"
            raise Forbidden(f"a Depot builder scoped to the {scope_name} builds for every app of it; "
                            "ask for one scoped to the app (fly deploy --depot-scope=app)")
        return line, body

    async def forward(self, scope: Scope, send: Any, frame: RequestFrame, target: Target, line: RequestLine,
                      claims: Claims, body: bytes | None) -> int:
        remember = line.resolved.route.remember
        if remember is None:
            return await super().forward(scope, send, frame, target, line, claims, body)
        headers = await self.outgoing_headers(scope, frame, body, line)
        headers.popall("Accept-Encoding", None)  # the gateway reads this answer: it must be plain
        frame.forwarding()
        response = await self.upstream.send(scope["method"], target.forward_target, headers, body)
        try:
            answer = await response.read_all(ANSWER_LIMIT)
            frame.record.upstream_ms = ms_since(response.started)
        finally:
            response.release()
        if 200 <= response.status < 300:
            await self._remember(remember, answer, line)
        elif response.status in (401, 403) and self.attenuator is not None:
            self.attenuator.forget(line.check.app)  # its numeric id may be stale
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [*keep_headers(response.headers), *_length_and_type(response.headers, answer),
                                (b"x-request-id", frame.request_id.encode("ascii"))]})
        await send({"type": "http.response.body", "body": answer, "more_body": False})
        return response.status

    async def _remember(self, kind: str, answer: bytes, line: RequestLine) -> None:
        try:
            document = json.loads(answer)
            identifier = document[kind]["id"]
        except (ValueError, KeyError, TypeError):
            return  # nothing to remember: a later PATCH of it is refused, not misattributed
        if isinstance(identifier, str | int) and line.check.app is not None:
            await self.store.remember(f"{kind}:{identifier}", line.check.app, expires_at=int(time.time()) + REMEMBER_S)


SENSITIVE_KEYS = ("app_name", "builder_scope")


def json_document(scope: Scope, body: bytes) -> dict[str, Any]:
    """The body as a JSON object, read the way a case-sensitive upstream reads it: strict JSON
    (core/jsonbody.py) with exact keys, `app_name`/`builder_scope` spelled exactly and only at the
    top level (a `release` wrapper naming another app could be what a framework hands the handler)."""
    if not is_json(scope["headers"]):
        raise BadRequest("send the body as Content-Type: application/json (UTF-8)")
    document = load_strict(body, "the body", fold=False)
    if not isinstance(document, dict):
        raise BadRequest("the body must be a JSON object")
    _check_keys(document, top=True)
    return document


def _check_keys(value: Any, *, top: bool) -> None:
    if isinstance(value, list):
        for item in value:
            _check_keys(item, top=False)
    elif isinstance(value, dict):
        for key, item in value.items():
            folded = key.casefold()
            if folded in SENSITIVE_KEYS and (key != folded or not top):
                raise BadRequest(f"the body names {key!r}; send {folded!r} exactly, once, at the top level")
            _check_keys(item, top=False)


def _length_and_type(headers: list[tuple[bytes, bytes]], body: bytes) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() in (b"content-type", b"content-encoding")]
    return [*kept, (b"content-length", str(len(body)).encode("ascii"))]
