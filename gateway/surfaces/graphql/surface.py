"""Fly's GraphQL API surface (`POST /graphql`): canonicalize → authenticate → resolve → decide →
rate-limit → forward → audit, like every surface.

Resolving a GraphQL request means reading every root field of every operation of every document
in it (a batch is a JSON array of requests) and the app each one names, wherever it is written:
a literal or a variable, an alias, a fragment, an `input` object (fly-go passes app *names* in
`appId`). All of them must be allowed, under one set of rules, or nothing is forwarded. What a
document may read below its root fields is bounded by the operation map's per-type field list
(documents.py), so `App.organization` does not lead to `Organization.apps`. Refusals are answered
in the shape GraphQL clients print (`errors[].message`, `extensions.code`), besides the gateway's
usual `error`/`message`/`request_id`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from graphql import GraphQLSchema, build_schema

from gateway.core.audit import AuditLog
from gateway.core.authorizer import Authorizer, Check
from gateway.core.grants import APP_NAME
from gateway.errors import BadRequest, Forbidden, GatewayError, error_body
from gateway.frame import RequestFrame
from gateway.metrics import GatewayMetrics
from gateway.surfaces import SurfaceLoad
from gateway.surfaces.graphql.documents import Document, DocumentAnalyzer, RootUse, argument_value
from gateway.surfaces.graphql.operations import OperationMap
from gateway.surfaces.http import RequestHeaders, Scope, client_ip, keep_headers, read_body, relay, send_json
from gateway.upstream.client import UpstreamClient, ms_since

SCHEMA_FILE = Path(__file__).with_name("fly-schema.graphql")
MAX_REQUEST_BYTES = 256 * 1024
MAX_BATCH = 10
ANSWER_LIMIT = 8 * 1024 * 1024  # an answer the gateway filters (organizations) is read whole
_REQUEST_KEYS = frozenset({"query", "variables", "operationName"})
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# fly-go knows UNAUTHORIZED (flyctl then suggests logging in again); the rest are the gateway's codes.
_CODES = {"forbidden": "FORBIDDEN", "unknown_route": "FORBIDDEN", "unauthenticated": "UNAUTHORIZED",
          "bad_request": "BAD_REQUEST"}


@functools.cache
def load_schema() -> GraphQLSchema:
    """Fly's schema, built once per process (~0.5 s): it ships with the package and never changes."""
    return build_schema(SCHEMA_FILE.read_text())


class GraphQLSurface:
    name = "graphql"

    def __init__(self, map_file: Path, *, schema: GraphQLSchema, authorizer: Authorizer, upstream: UpstreamClient,
                 audit: AuditLog, metrics: GatewayMetrics, org_slug: str | None) -> None:
        self.map_file = map_file
        self.schema = schema
        self.authorizer = authorizer
        self.upstream = upstream
        self.audit = audit
        self.metrics = metrics
        self.org_slug = org_slug
        self.analyzer: DocumentAnalyzer | None = None

    def serves(self, path: str) -> bool:
        return path == "/graphql"

    def load(self) -> SurfaceLoad:
        operations = OperationMap.load(self.map_file, self.schema)

        def install() -> None:
            self.analyzer = DocumentAnalyzer(self.schema, operations)

        return SurfaceLoad(operations.produced_actions(), install)

    def ready(self) -> bool:
        return self.analyzer is not None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        frame = RequestFrame(self.audit, self.metrics, client_ip=client_ip(scope), method=scope["method"],
                             path="/graphql")

        async def refuse(error: GatewayError) -> None:
            # HTTP 200, as Fly's own GraphQL API answers refusals: fly-go's GraphQL client (what flyctl
            # runs) reads `errors` only from a 200 and prints "non-200 status code" for anything else.
            # The refusal's own status is in `extensions.status` and in the audit record.
            await send_json(send, 200, graphql_error_body(error, frame.request_id), frame.request_id,
                            headers=error.headers)

        await frame.run(lambda: self.handle(frame, scope, receive, send), refuse)

    async def handle(self, frame: RequestFrame, scope: Scope, receive: Any, send: Any) -> None:
        record = frame.record
        # 1. canonicalize: exactly `POST /graphql` with a JSON body, nothing in the query string.
        if scope["method"] != "POST":
            raise BadRequest("send GraphQL requests as POST /graphql with a JSON body")
        if scope.get("query_string") or b"?" in (scope.get("raw_path") or b""):
            raise BadRequest("send the GraphQL request in the JSON body, never in the query string")
        headers = RequestHeaders(scope["headers"])
        # 2. authenticate
        claims = await self.authorizer.authenticate(headers.authorization)
        frame.identify(claims)
        # 3. resolve: every root field of every operation, and the app each one names.
        headers.check_declared_length(MAX_REQUEST_BYTES)
        body = await read_body(receive, MAX_REQUEST_BYTES)
        requests = parse_requests(body)
        analyzer = self.analyzer
        assert analyzer is not None  # installed before the gateway serves
        documents = [(analyzer.analyze(query), variables) for query, variables in requests]
        checks = [check for document, variables in documents for check in self.checks(document, variables)]
        first = checks[0] if checks else None
        record.action, record.app, record.env = (first.action, first.app, first.env) if first else (None, None, None)
        uses = [use for document, _ in documents for use in document.uses]
        if len(uses) > 1:  # the record's action and app name the first; the others are listed
            record.extra = {"graphql": [f"{use.rule.operation} {use.rule.field}" for use in uses]}
        # 4. decide: every check must be allowed.
        ruling = self.authorizer.decide(claims, checks)
        if not ruling.allowed:
            raise Forbidden(ruling.decision.reason)
        frame.allow(ruling.decision.reason)
        # 5. rate-limit, 6. forward (7. audit: the frame).
        await self.authorizer.rate_limit(claims)
        filtered = [use for document, _ in documents for use in document.uses if use.rule.filter_organizations]
        record.status = await self.forward(scope, send, frame, body, filtered)

    def checks(self, document: Document, variables: dict[str, Any]) -> list[Check]:
        checks: list[Check] = []
        for use in document.uses:
            app = self.app_of(use, variables)
            checks.append(self.authorizer.check(use.rule.action, app))
            checks += [self.authorizer.check(action, app) for action in use.field_actions]
        return checks

    def app_of(self, use: RootUse, variables: dict[str, Any]) -> str | None:
        """The app `use` names (None: a platform read), however it is spelled; refuses anything else."""
        where = f"GraphQL field {use.rule.field}"
        given = {**use.defaults, **variables}
        found: list[tuple[str, Any]] = []
        for source in use.rule.sources:
            if source.kind == "none":
                return None
            if source.kind == "input":
                node = use.arguments.get("input")
                value = argument_value(node, given) if node is not None else None
                if isinstance(value, dict) and value.get(source.name) is not None:
                    found.append((f"input.{source.name}", value[source.name]))
                continue
            node = use.arguments.get(source.name)
            if node is not None:
                value = argument_value(node, given)
                if value is not None:
                    found.append((source.name, value))
        spelled = " or ".join(s.name if s.kind != "input" else f"input.{s.name}" for s in use.rule.sources)
        if len(found) != 1:
            raise BadRequest(f"{where} must name its app in exactly one of {spelled}")
        name, value = found[0]
        if use.rule.sources[0].kind == "org":
            if self.org_slug is None or value != self.org_slug:
                raise Forbidden(f"{where}: organization {value!r} is not the one this gateway serves"
                                + (f" ({self.org_slug})" if self.org_slug else " (upstream.org_slug is not set)"))
            return None
        if not isinstance(value, str) or not APP_NAME.fullmatch(value):
            raise BadRequest(f"{where}: {name} must be an app name (lowercase letters, digits and '-'), "
                             "the way flyctl sends it")
        return value

    async def forward(self, scope: Scope, send: Any, frame: RequestFrame, body: bytes, filtered: list[RootUse]) -> int:
        headers = self.upstream.build_headers(scope["headers"], client_ip=frame.record.client_ip,
                                              scheme=scope.get("scheme", "http"), request_id=frame.request_id)
        response = await self.upstream.send("POST", b"", headers, body)
        try:
            if filtered and 200 <= response.status < 300:
                answer = await response.read_all(ANSWER_LIMIT)
                frame.record.upstream_ms = ms_since(response.started)
                document = self.filter_organizations(answer, filtered)
                await send_json(send, response.status, document, frame.request_id,
                                extra=keep_headers(response.headers))
                return response.status
            await relay(send, response, frame.request_id)
            frame.record.upstream_ms = ms_since(response.started)
            return response.status
        finally:
            response.release()

    def filter_organizations(self, answer: bytes, uses: list[RootUse]) -> Any:
        """`organizations` cut to the gateway's own organization: never another's name or id."""
        try:
            document = json.loads(answer)
            items = document if isinstance(document, list) else [document]
            for item in items:
                data = item.get("data") or {}
                for use in uses:
                    connection = data.get(use.response_key)
                    if connection is None:
                        continue
                    for key in ("nodes", "edges"):
                        if isinstance(connection.get(key), list):
                            connection[key] = [entry for entry in connection[key] if self._ours(entry)]
                    if "totalCount" in connection:
                        connection["totalCount"] = len(connection.get("nodes") or connection.get("edges") or [])
        except (ValueError, AttributeError, TypeError):
            raise GatewayError("the upstream's organizations answer has an unexpected shape; it cannot be "
                               "filtered, so it is withheld") from None
        return document

    def _ours(self, entry: Any) -> bool:
        organization = entry.get("node", entry) if isinstance(entry, dict) else None
        return isinstance(organization, dict) and self.org_slug is not None \
            and organization.get("slug") == self.org_slug


def parse_requests(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(document, variables) of each request in the body: one JSON object, or a batch (an array)."""
    try:
        text = body.decode("utf-8")  # strict: no surrogates smuggled in as bytes
        parsed = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(parsed).encode("utf-8")  # a lone surrogate would be read differently upstream
    except (ValueError, UnicodeError) as exc:
        raise BadRequest(f"the GraphQL request is not valid JSON ({exc}); send "
                         '{"query": "...", "variables": {...}}') from None
    batch = parsed if isinstance(parsed, list) else [parsed]
    if not batch or len(batch) > MAX_BATCH:
        raise BadRequest(f"a GraphQL batch holds 1 to {MAX_BATCH} requests")
    requests = []
    for item in batch:
        if not isinstance(item, dict) or not isinstance(item.get("query"), str):
            raise BadRequest('each GraphQL request is a JSON object with a "query" string (persisted queries are '
                             "not served through the gateway)")
        unknown = sorted(set(item) - _REQUEST_KEYS)
        if unknown:
            raise BadRequest(f"unknown GraphQL request key(s) {', '.join(unknown)}; send query, variables and "
                             "operationName only")
        variables = item.get("variables") or {}
        if not isinstance(variables, dict):
            raise BadRequest("GraphQL variables must be a JSON object")
        if item.get("operationName") is not None and not isinstance(item["operationName"], str):
            raise BadRequest("operationName must be a string")
        requests.append((item["query"], variables))
    return requests


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"the key {key!r} appears twice")
        document[key] = value
    return document


def graphql_error_body(error: GatewayError, request_id: str) -> dict[str, Any]:
    """The gateway's error body, with the `errors` list GraphQL clients (flyctl) print."""
    body: dict[str, Any] = error_body(error, request_id)
    code = _CODES.get(error.code, error.code.upper())
    extensions = {"code": code, "status": error.status, "request_id": request_id}
    return {"errors": [{"message": body["message"], "extensions": extensions}], **body}
