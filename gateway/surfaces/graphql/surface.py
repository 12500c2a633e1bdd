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
import hashlib
import json
from pathlib import Path
from typing import Any

from graphql import GraphQLSchema, NamedTypeNode, NonNullTypeNode, VariableDefinitionNode, build_schema
from graphql.execution.values import get_variable_values

from gateway.core.audit import AuditLog
from gateway.core.authorizer import Authorizer, Check
from gateway.core.constraints import image_repository
from gateway.core.grants import APP_NAME
from gateway.core.jsonbody import load_strict
from gateway.errors import BadRequest, Forbidden, GatewayError, error_body
from gateway.frame import RequestFrame
from gateway.metrics import GatewayMetrics
from gateway.surfaces import SurfaceLoad
from gateway.surfaces.graphql.documents import Document, DocumentAnalyzer, RootUse, argument_value
from gateway.surfaces.graphql.operations import OperationMap
from gateway.surfaces.graphql.resolution import DecisionKey, Resolution
from gateway.surfaces.http import (
    FLYCTL_HEADERS,
    RequestHeaders,
    Scope,
    client_ip,
    is_json,
    keep_headers,
    read_body,
    relay,
    send_json,
)
from gateway.upstream.attenuation import Attenuator
from gateway.upstream.client import UpstreamClient, ms_since

SCHEMA_FILE = Path(__file__).with_name("fly-schema.graphql")
FLY_REGISTRY = "registry.fly.io/"
MAX_REQUEST_BYTES = 256 * 1024
MAX_BATCH = 10
RESOLVED_LIMIT = 2_048  # bodies kept resolved; cleared whole when full, like the document cache
# Only small resolutions are kept (flyctl's have one to three checks): a hostile body of hundreds
# of root fields, varied by an unused variable, must not fill memory with them.
RESOLVED_MAX_CHECKS = 16
RESOLVED_MAX_BODY = 16 * 1024
ANSWER_LIMIT = 8 * 1024 * 1024  # an answer the gateway filters (organizations) is read whole
_REQUEST_KEYS = frozenset({"query", "variables", "operationName"})
# Request headers forwarded to the GraphQL API (SECURITY.md): flyctl's.
GRAPHQL_HEADERS = FLYCTL_HEADERS
# fly-go knows UNAUTHORIZED (flyctl then suggests logging in again); the rest are the gateway's codes.
_CODES = {"forbidden": "FORBIDDEN", "unknown_route": "FORBIDDEN", "unauthenticated": "UNAUTHORIZED",
          "bad_request": "BAD_REQUEST"}


@functools.cache
def load_schema() -> GraphQLSchema:
    """Fly's schema, built once per process (~0.5 s): it ships with the package and never changes."""
    return build_schema(SCHEMA_FILE.read_text())


class GraphQLSurface:
    name = "graphql"
    prefixes: tuple[str, ...] = ("/graphql",)

    def __init__(self, map_file: Path, *, schema: GraphQLSchema, authorizer: Authorizer, upstream: UpstreamClient,
                 audit: AuditLog, metrics: GatewayMetrics, org_slug: str | None,
                 attenuator: Attenuator | None = None) -> None:
        self.map_file = map_file
        self.attenuator = attenuator  # upstream.attenuate: apps
        self.schema = schema
        self.authorizer = authorizer
        self.upstream = upstream
        self.audit = audit
        self.metrics = metrics
        self.org_slug = org_slug
        self.analyzer: DocumentAnalyzer | None = None
        self._resolved: dict[bytes, Resolution] = {}  # body SHA-256 -> resolution, under this analyzer

    def serves(self, path: str) -> bool:
        return path == "/graphql"

    def load(self) -> SurfaceLoad:
        operations = OperationMap.load(self.map_file, self.schema)

        def install() -> None:
            self.analyzer = DocumentAnalyzer(self.schema, operations)
            self._resolved = {}  # resolved under the old map

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

        await frame.run(self.handle(frame, scope, receive, send), refuse)

    async def handle(self, frame: RequestFrame, scope: Scope, receive: Any, send: Any) -> None:
        record = frame.record
        # 1. canonicalize: exactly `POST /graphql` with a JSON body, nothing in the query string.
        if scope["method"] != "POST":
            raise BadRequest("send GraphQL requests as POST /graphql with a JSON body")
        if scope.get("query_string") or b"?" in (scope.get("raw_path") or b""):
            raise BadRequest("send the GraphQL request in the JSON body, never in the query string")
        headers = RequestHeaders(scope["headers"])
        if not is_json(scope["headers"]):
            raise BadRequest("send the GraphQL request as Content-Type: application/json (UTF-8)")
        # 2. authenticate
        claims = await self.authorizer.authenticate(headers.authorization)
        frame.identify(claims)
        # 3. resolve: every root field of every operation, and the app each one names.
        headers.check_declared_length(MAX_REQUEST_BYTES)
        body = await read_body(receive, MAX_REQUEST_BYTES)
        resolution = self.resolve(body)
        checks = resolution.checks
        first = checks[0] if checks else None
        record.action, record.app, record.env = (first.action, first.app, first.env) if first else (None, None, None)
        if len(checks) > 1:  # the record's action and app are the first's; every one is listed
            record.extra = {"graphql": [{"field": field, "action": check.action, "app": check.app, "env": check.env}
                                        for field, check in resolution.asked]}
        # 4. decide: every check must be allowed; the same documents asking the same checks get the
        # decision this token got for them before.
        key = resolution.key
        cached = self.authorizer.cached(claims, key)
        if cached is not None:
            frame.allow(cached.decision.reason)
            record.who, record.what = cached.who, cached.what
        else:
            ruling = self.authorizer.decide(claims, checks)
            if not ruling.allowed:
                if ruling.check is not None:  # the record names the field that was refused
                    record.action, record.app, record.env = ruling.check.action, ruling.check.app, ruling.check.env
                raise Forbidden(ruling.decision.reason)
            for check in checks:
                if self.authorizer.constraints(ruling, check):
                    # Request-shape constraints judge Machines API bodies; a GraphQL document cannot be
                    # held to them, so an action they apply to is not done through GraphQL.
                    raise Forbidden(f"{check.action} on app {check.app} has request-shape constraints the "
                                    "gateway checks on the Machines API only; use the Machines API for it")
            frame.allow(ruling.decision.reason)
            self.authorizer.remember(claims, key, ruling, record)
        # 5. rate-limit, 6. forward (7. audit: the frame).
        await self.authorizer.rate_limit(claims)
        record.status = await self.forward(scope, send, frame, body, resolution)

    def resolve(self, body: bytes) -> Resolution:
        """What the body asks: every root field of every request in it and the check each one needs.
        The same bytes always resolve the same way under one operation map (variables are part of
        the body), so a body seen before is looked up by its hash, not parsed and checked again."""
        analyzer, resolved = self.analyzer, self._resolved
        assert analyzer is not None  # installed before the gateway serves
        key = hashlib.sha256(body).digest()
        hit = resolved.get(key)
        if hit is not None:
            return hit
        documents = [(analyzer.analyze(query), variables) for query, variables in parse_requests(body)]
        asked = tuple(pair for document, variables in documents for pair in self.checks(document, variables))
        checks = tuple(check for _, check in asked)
        resolution = Resolution(asked, checks, tuple(use for document, _ in documents for use in document.filtered),
                                DecisionKey(tuple(document for document, _ in documents), checks))
        if len(checks) <= RESOLVED_MAX_CHECKS and len(body) <= RESOLVED_MAX_BODY:
            if len(resolved) >= RESOLVED_LIMIT:
                resolved.clear()
            resolved[key] = resolution
        return resolution

    def checks(self, document: Document, variables: dict[str, Any]) -> list[tuple[str, Check]]:
        """What the document asks, with these variables: one check per root field and field action.
        The variables must be what the operations declare (graphql-core's coercion, as the upstream
        will do it), and every argument the map lets through must hold what its kind allows."""
        for definitions in document.variables:
            if definitions and not _plain_scalars(definitions, variables):
                coerced = get_variable_values(self.schema, definitions, variables, max_errors=3)
                if isinstance(coerced, list):
                    raise BadRequest("GraphQL variables do not fit the operation: "
                                     + "; ".join(error.message for error in coerced))
        checks: list[tuple[str, Check]] = []
        for use in document.uses:
            app = self.app_of(use, variables)
            self.check_arguments(use, variables, app)
            field = f"{use.rule.operation} {use.rule.field}"
            checks.append((field, self.authorizer.check(use.rule.action, app)))
            checks += [(field, self.authorizer.check(action, app)) for action in use.field_actions]
        return checks

    def check_arguments(self, use: RootUse, variables: dict[str, Any], app: str | None) -> None:
        if use.rule.input_fields and "input" in use.arguments:
            given = argument_value(use.arguments["input"], variables, use.defaults)
            extra = sorted(set(given) - use.rule.input_fields) if isinstance(given, dict) else []
            if extra:
                raise Forbidden(f"GraphQL field {use.rule.field}: input field(s) {', '.join(extra)} are not accepted "
                                f"through the gateway (accepted: {', '.join(sorted(use.rule.input_fields))})")
        for where, node, kind in use.arg_checks:
            value = argument_value(node, variables, use.defaults)
            if kind == "any" or value is None:
                continue
            if not isinstance(value, str):
                raise BadRequest(f"{where} must be an image reference")
            repository = image_repository(value)
            if not repository.startswith(FLY_REGISTRY):
                continue
            if kind == "public-image" or repository != FLY_REGISTRY + (app or ""):
                raise Forbidden(f"{where}: {repository} is not an image of "
                                + (f"app {app}" if kind == "app-image" and app else "a public registry")
                                + "; the gateway does not read other apps' images")

    def app_of(self, use: RootUse, variables: dict[str, Any]) -> str | None:
        """The app `use` names (None: a platform read), however it is spelled; refuses anything else."""
        found: list[tuple[str, Any]] = []
        for source in use.rule.sources:
            if source.kind == "none":
                return None
            if source.kind == "input":
                node = use.arguments.get("input")
                value = argument_value(node, variables, use.defaults) if node is not None else None
                if isinstance(value, dict) and value.get(source.name) is not None:
                    found.append((f"input.{source.name}", value[source.name]))
                continue
            node = use.arguments.get(source.name)
            if node is not None:
                value = argument_value(node, variables, use.defaults)
                if value is not None:
                    found.append((source.name, value))
        where = f"GraphQL field {use.rule.field}"
        if len(found) != 1:
            spelled = " or ".join(s.name if s.kind != "input" else f"input.{s.name}" for s in use.rule.sources)
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

    async def forward(self, scope: Scope, send: Any, frame: RequestFrame, body: bytes, resolution: Resolution) -> int:
        filtered = resolution.filtered
        headers = self.upstream.build_headers(scope["headers"], allowed=GRAPHQL_HEADERS,
                                              client_ip=frame.record.client_ip, scheme=scope.get("scheme", "http"),
                                              request_id=frame.request_id)
        headers["Content-Type"] = "application/json"  # the type the gateway read the body as, whatever was sent
        if filtered:
            headers.popall("Accept-Encoding", None)  # the gateway reads this answer: it must be plain
        if self.attenuator is not None:
            if resolution.mixed:
                # One credential per body: a Mutations caveat would refuse the queries, none would let
                # the mutations run under the whole organization's power. flyctl never mixes them.
                raise BadRequest("upstream.attenuate: apps forwards a GraphQL body of mutations or of queries, "
                                 "not both; send the mutations and the queries as separate requests")
            headers["Authorization"] = self.attenuator.graphql_authorization(resolution.mutations)
        frame.forwarding()
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

    def filter_organizations(self, answer: bytes, uses: tuple[RootUse, ...]) -> Any:
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
    # Strict JSON with exact keys (core/jsonbody.py): UTF-8, no duplicate keys, no NaN, no lone
    # surrogate, bounded nesting; what it refuses, it names.
    parsed = load_strict(body, "the GraphQL request", fold=False)
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
        variables = item.get("variables")
        if variables is None:
            variables = {}
        if not isinstance(variables, dict):
            raise BadRequest("GraphQL variables must be a JSON object (or null)")
        if item.get("operationName") is not None and not isinstance(item["operationName"], str):
            raise BadRequest("operationName must be a string")
        requests.append((item["query"], variables))
    return requests


_SCALARS: dict[str, type | tuple[type, ...]] = {"String": str, "ID": str, "Boolean": bool}


def _plain_scalars(definitions: tuple[VariableDefinitionNode, ...], variables: dict[str, Any]) -> bool:
    """Every declared variable is a String, ID or Boolean given as such (or absent): what flyctl
    sends. Coercion would find nothing to object to, so the per-request cost is skipped; anything
    else (numbers, lists, input objects) goes through graphql-core's coercion."""
    for definition in definitions:
        required = isinstance(definition.type, NonNullTypeNode)
        node = definition.type.type if isinstance(definition.type, NonNullTypeNode) else definition.type
        expected = _SCALARS.get(node.name.value) if isinstance(node, NamedTypeNode) else None
        value = variables.get(definition.variable.name.value)
        if expected is None or (value is None and required and definition.default_value is None):
            return False  # not a plain scalar, or a required one missing: coercion says what is wrong
        if value is not None and not isinstance(value, expected):
            return False
    return True


def graphql_error_body(error: GatewayError, request_id: str) -> dict[str, Any]:
    """The gateway's error body, with the `errors` list GraphQL clients (flyctl) print."""
    body: dict[str, Any] = error_body(error, request_id)
    code = _CODES.get(error.code, error.code.upper())
    extensions = {"code": code, "status": error.status, "request_id": request_id}
    return {"errors": [{"message": body["message"], "extensions": extensions}], **body}
