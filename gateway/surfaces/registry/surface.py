"""Fly's image registry surface (`/v2/...`, the Distribution API): canonicalize → authenticate →
resolve → decide → rate-limit → forward → audit, like every surface.

Repository = app: pulls need `images:pull` on the app, pushes `images:push`, deletes
`images:delete`, and a cross-repository mount pull on the source app too. What differs from the
other surfaces:

- Clients log in the way docker does (`docker login -u x -p sgt_...`): `/v2/` answers 401 with
  `WWW-Authenticate: Basic realm="scopegate"` until they send `Authorization: Basic
  base64(<any user>:sgt_...)` (or `Bearer sgt_...`), which the gateway turns into the token the
  core verifies. The upstream gets its own credential as basic auth `x` / credential.
- Blobs are streamed both ways, never read whole: uploads are bounded by
  `limits.max_blob_bytes`, not `limits.max_body_bytes`.
- Upload sessions are bound to the repository they were opened for (the store remembers
  `upload:<id>` -> app, so every instance knows), and their Location headers are rewritten to
  point back at the gateway (locations.py).
- Refusals carry the Distribution error shape (`errors[].code`) that registry clients print,
  besides the gateway's usual `error`/`message`/`request_id`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import time
from typing import Any

from gateway.core.audit import AuditLog
from gateway.core.authorizer import Authorizer, Check
from gateway.core.rules import ProducedAction
from gateway.errors import GatewayError, TooLarge, Unauthenticated, UpstreamUnavailable, error_body
from gateway.frame import RequestFrame
from gateway.metrics import GatewayMetrics
from gateway.store import TokenStore
from gateway.surfaces import SurfaceLoad
from gateway.surfaces.http import (
    CLIENT_HEADERS,
    BodyStream,
    RequestHeaders,
    Scope,
    client_ip,
    printable,
    relay,
    request_target,
    send_json,
)
from gateway.surfaces.registry import locations
from gateway.surfaces.registry.requests import ACTIONS, PULL, RegistryRefusal, RegistryRequest, denied, describe, parse
from gateway.upstream.client import UpstreamClient, ms_since

REALM = 'Basic realm="scopegate"'
# Request headers forwarded to the registry (SECURITY.md): what docker, crane and skopeo send for
# content negotiation, ranged blob reads and chunked uploads.
REGISTRY_HEADERS = CLIENT_HEADERS | {b"range", b"if-range", b"content-range", b"if-none-match", b"if-match"}
API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")
UPLOAD_TTL_S = 7 * 86400  # the registry purges abandoned uploads after a week
_REGISTRY_CODES = {"unauthenticated": "UNAUTHORIZED", "forbidden": "DENIED", "unknown_route": "NAME_UNKNOWN",
                   "too_large": "SIZE_INVALID", "rate_limited": "TOOMANYREQUESTS", "bad_request": "UNSUPPORTED"}
_LOGIN_HINT = "log in with docker login -u x -p sgt_... (any user name; the password is a Scopegate token)"


def produced_actions() -> list[ProducedAction]:
    """The actions registry requests are decided on (fixed: the Distribution API has no route map)."""
    return [ProducedAction(action, "registry surface (gateway/surfaces/registry)") for action in ACTIONS]


class RegistrySurface:
    name = "registry"
    prefixes: tuple[str, ...] = ("/v2",)  # app.py asks serves() only for paths under these

    def __init__(self, *, authorizer: Authorizer, upstream: UpstreamClient, audit: AuditLog, metrics: GatewayMetrics,
                 store: TokenStore, max_body_bytes: int, max_blob_bytes: int) -> None:
        self.authorizer = authorizer
        self.upstream = upstream
        self.audit = audit
        self.metrics = metrics
        self.store = store
        self.max_body_bytes = max_body_bytes
        self.max_blob_bytes = max_blob_bytes

    def serves(self, path: str) -> bool:
        return path == "/v2" or path.startswith("/v2/")

    def load(self) -> SurfaceLoad:
        return SurfaceLoad(produced_actions(), lambda: None)

    def ready(self) -> bool:
        return True

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        raw_path, raw_query, has_query = request_target(scope)
        frame = RequestFrame(self.audit, self.metrics, client_ip=client_ip(scope), method=scope["method"],
                             path=printable(raw_path))

        async def refuse(error: GatewayError) -> None:
            await send_registry_error(send, error, frame.request_id)

        await frame.run(lambda: self.handle(frame, scope, receive, send, raw_path, raw_query, has_query), refuse)

    async def handle(self, frame: RequestFrame, scope: Scope, receive: Any, send: Any, raw_path: bytes,
                     raw_query: bytes, has_query: bool) -> None:
        record, method = frame.record, scope["method"]
        # 1. canonicalize: one endpoint, one repository (= app), only the query keys it defines.
        request = parse(method, raw_path, raw_query, has_query)
        headers = RequestHeaders(scope["headers"])
        check_body_type(request, scope["headers"], headers.has_body, b"digest=" in raw_query)
        # 2. authenticate: docker's basic auth (password = the token) or a bearer token.
        claims = await self.authorizer.authenticate(token_authorization(headers.authorization))
        frame.identify(claims)
        if request.kind == "base":  # the login check: the token is good, nothing to forward
            await self.authorizer.rate_limit(claims)
            record.decision, record.status, record.reason = "allow", 200, "answered by the gateway: registry login"
            await send_json(send, 200, {}, frame.request_id, extra=[API_VERSION])
            return
        # 3. resolve: the checks, and the repository an upload session was opened for.
        checks = self.checks(request)
        record.action, record.app, record.env = checks[0].action, checks[0].app, checks[0].env
        record.extra = describe(request)
        limit = self.body_limit(request, method, headers)
        if limit is not None and request.upload_id is not None:
            # The limit is the upload's, over all its chunks, not each request's.
            limit -= await self.uploaded(request.upload_id)
            if any(value.isdigit() and int(value) > limit for value in headers.lengths) or limit < 0:
                raise too_large(request, self.max_blob_bytes)
        # 4. decide: every check (a mount: push here and pull where it comes from).
        ruling = self.authorizer.decide(claims, checks)
        if not ruling.allowed:
            raise denied(ruling.decision.reason)
        for check in checks:
            if self.authorizer.constraints(ruling, check):  # body constraints cannot apply to layers
                raise denied(f"a constraint applies to {check.action}, which registry requests cannot satisfy")
        if request.upload_id is not None:
            await self.check_upload(request)
        frame.allow(ruling.decision.reason)
        # 5. rate-limit, 6. forward (7. audit: the frame).
        await self.authorizer.rate_limit(claims)
        record.status = await self.forward(scope, receive, send, frame, request, limit, headers.lengths)

    def checks(self, request: RegistryRequest) -> list[Check]:
        assert request.action is not None and request.repo is not None
        checks = [self.authorizer.check(request.action, request.repo)]
        if request.mount_from is not None:
            checks.append(self.authorizer.check(PULL, request.mount_from))
        return checks

    def body_limit(self, request: RegistryRequest, method: str, headers: RequestHeaders) -> int | None:
        """The most the body may hold (None: the request takes no body); checks Content-Length."""
        if method not in ("PUT", "PATCH", "POST"):
            if headers.has_body:
                raise RegistryRefusal(400, "bad_request", "UNSUPPORTED", f"{method} takes no request body")
            return None
        limit = self.max_blob_bytes if request.carries_blob else self.max_body_bytes
        for value in headers.lengths:
            if not value.isdigit():
                raise RegistryRefusal(400, "bad_request", "SIZE_INVALID", "Content-Length is not a number")
            if int(value) > limit:
                raise too_large(request, limit)
        return limit if headers.has_body else None

    async def uploaded(self, upload_id: str) -> int:
        """Bytes this upload session has carried through the gateway so far."""
        total = await self.store.recall(f"upload-bytes:{upload_id}")
        return int(total) if total is not None and total.isdigit() else 0

    async def check_upload(self, request: RegistryRequest) -> None:
        """An upload session continues only in the repository it was opened for through the gateway."""
        bound = await self.store.recall(f"upload:{request.upload_id}")
        if bound is None:
            raise RegistryRefusal(404, "unknown_route", "BLOB_UPLOAD_UNKNOWN",
                                  "this upload was not opened through this gateway (or has expired); "
                                  f"start one with POST /v2/{request.repo}/blobs/uploads/")
        if bound != request.repo:
            raise denied(f"this upload was opened for another repository, not {request.repo}")

    async def forward(self, scope: Scope, receive: Any, send: Any, frame: RequestFrame, request: RegistryRequest,
                      limit: int | None, declared: list[bytes]) -> int:
        record = frame.record
        headers = self.upstream.build_headers(scope["headers"], allowed=REGISTRY_HEADERS, client_ip=record.client_ip,
                                              scheme=scope.get("scheme", "http"), request_id=frame.request_id)
        # The registry builds upload Locations from X-Forwarded-Host: a client-chosen host would make
        # it name another host after it has acted. Locations are rewritten to the gateway anyway.
        headers.popall("X-Forwarded-Host", None)
        if limit is not None and request.carries_blob:
            headers["Content-Type"] = "application/octet-stream"  # layer bytes, never a form the registry parses
        target, query, has_query = request_target(scope)
        if has_query:
            target += b"?" + query
        stream = None if limit is None else BodyStream(receive, limit)
        if stream is not None and len(declared) == 1:
            # The body passes through as the client frames it: exactly these bytes, or the upload is cut.
            headers["Content-Length"] = declared[0].decode("ascii")
        # Layers are streamed, so a body that stalls or breaks the limit from here on has partly
        # reached the registry: the audit record says so (frame.py), it does not claim a denial.
        frame.forwarding()
        try:  # the body goes upstream as it arrives, chunk by chunk: a layer is never held whole
            response = await self.upstream.send(scope["method"], target, headers,
                                                None if stream is None else stream.chunks())
        except GatewayError:
            if stream is not None and stream.error is not None:
                raise too_large(request, stream.limit) if isinstance(stream.error, TooLarge) else stream.error from None
            raise
        try:
            if response.status == 401:  # the gateway's own credential, never the client's fault
                raise UpstreamUnavailable("the upstream registry refused the gateway's credential "
                                          "(upstream.token_env / upstream.token_file)")
            rewritten = locations.rewrite(response.headers, request, upstream_base=self.upstream.base,
                                          forwarded_host=headers.get("X-Forwarded-Host") or "")
            if rewritten.upload_id is not None and rewritten.upload_id != request.upload_id:
                assert request.repo is not None
                await self.store.remember(f"upload:{rewritten.upload_id}", request.repo,
                                          expires_at=int(time.time()) + UPLOAD_TTL_S)
            if stream is not None and request.upload_id is not None and 200 <= response.status < 300:
                total = await self.uploaded(request.upload_id) + stream.received
                await self.store.remember(f"upload-bytes:{request.upload_id}", str(total),
                                          expires_at=int(time.time()) + UPLOAD_TTL_S)
            response.headers = rewritten.headers
            await relay(send, response, frame.request_id)
            record.upstream_ms = ms_since(response.started)
            return response.status
        finally:
            response.release()


_FORM_TYPES = (b"application/x-www-form-urlencoded", b"multipart/")


def check_body_type(request: RegistryRequest, headers: list[tuple[bytes, bytes]], has_body: bool,
                    digest: bool) -> None:
    """A body means the same to the gateway and the registry: layer bytes are octet streams (a form
    body could carry `mount=...&from=<another app>`, which the registry would read), a manifest is
    never a form, and starting an upload carries a body only when it is monolithic (`?digest=`)."""
    if not has_body:
        return
    types = [value.split(b";")[0].strip().lower() for name, value in headers if name == b"content-type"]
    if len(types) > 1 or any(kind.startswith(_FORM_TYPES) for kind in types):
        raise RegistryRefusal(400, "bad_request", "UNSUPPORTED", "a form body is not a registry request body; "
                              "send layers as application/octet-stream")
    if request.carries_blob:
        if types and types[0] != b"application/octet-stream":
            raise RegistryRefusal(400, "bad_request", "UNSUPPORTED",
                                  "layer data is sent as Content-Type: application/octet-stream")
        if request.kind == "upload_start" and not digest:
            raise RegistryRefusal(400, "bad_request", "UNSUPPORTED",
                                  "starting an upload takes no body unless it is monolithic (?digest=...)")


def token_authorization(values: list[bytes]) -> list[bytes]:
    """The client's credentials as the header values `Authorizer.authenticate` takes (`Bearer
    sgt_...`). Docker-style clients send basic auth with the token as the password."""
    if not values:
        raise Unauthenticated(f"the registry needs credentials; {_LOGIN_HINT}")
    if len(values) > 1:
        raise Unauthenticated("send exactly one Authorization header")
    scheme, _, rest = values[0].strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return values
    if scheme.lower() != b"basic":
        raise Unauthenticated(f"the registry takes basic or bearer credentials; {_LOGIN_HINT}")
    try:
        decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated(f"the basic credentials are not base64 of user:password; {_LOGIN_HINT}") from None
    _, colon, password = decoded.partition(":")
    if not colon or not password.startswith("sgt_"):
        raise Unauthenticated(f"the password is not a Scopegate token; {_LOGIN_HINT}")
    return [b"Bearer " + password.encode("utf-8")]


def too_large(request: RegistryRequest, limit: int) -> RegistryRefusal:
    key = "limits.max_blob_bytes" if request.carries_blob else "limits.max_body_bytes"
    return RegistryRefusal(413, "too_large", "SIZE_INVALID", f"the request body is larger than {key} ({limit} bytes)")


async def send_registry_error(send: Any, error: GatewayError, request_id: str) -> None:
    """The Distribution error shape (`errors[].code`, what registry clients print) with the
    gateway's own fields; a 401 carries the basic challenge clients log in with."""
    body: dict[str, Any] = dict(error_body(error, request_id))
    code = getattr(error, "registry_code", None) or _REGISTRY_CODES.get(error.code, "UNAVAILABLE")
    body["errors"] = [{"code": code, "message": body["message"], "detail": {"request_id": request_id}}]
    headers = dict(error.headers)
    if error.status == 401:
        headers["WWW-Authenticate"] = REALM
    with contextlib.suppress(RuntimeError):  # the response had already started (a stream broke midway)
        await send_json(send, error.status, body, request_id, extra=[API_VERSION], headers=headers)
