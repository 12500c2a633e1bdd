"""The route map: which upstream operation a request is, what action it performs, whose app.

Route files (`policies/routes/*.yaml`) list every operation of the upstream API with its
method, path template, action and app source. `RouteTable.resolve` matches a canonical path
(see `paths.py`) segment by segment; anything that matches no route is `unknown_route`, so a
new upstream endpoint is denied until someone maps it. `resolve_request` turns a match plus the
query and body into the (app, action) the decision needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import yaml

from gateway.core.grants import APP_NAME
from gateway.core.jsonbody import load_strict
from gateway.core.rules import ProducedAction
from gateway.errors import BadRequest, ConfigError, Forbidden, UnknownRoute

# path: a path parameter; body: JSON body field(s); none: org level; org: a path parameter that must
# name the gateway's own organization (decided as org level); lookup: an id whose app the gateway
# remembered from an earlier allowed answer (`remember`).
AppSource = Literal["path", "body", "none", "org", "lookup"]
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_FALSE = frozenset({"", "0", "f", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class Refinement:
    query: str
    action: str


@dataclass(frozen=True, slots=True)
class Route:
    operation: str
    method: str
    path: str
    action: str
    app_source: AppSource
    app_fields: tuple[str, ...]  # the path param, or the body fields in order
    segments: tuple[str | None, ...]  # literal segment, or None for a {param}
    params: tuple[str | None, ...]
    refine: Refinement | None = None
    deny_always: bool = False
    answer_gateway: bool = False
    filter_apps: bool = False
    remember: str | None = None  # the answer's `<remember>.id` belongs to the request's app
    reason: str = ""
    source: str = ""
    takes_body: bool = False  # the operation has a request body (JSON)
    fields: frozenset[str] | None = None  # its request schema's top-level fields, where declared

    @property
    def needs_body(self) -> bool:
        return self.app_source == "body"

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        values: dict[str, str] = {}
        for part, literal, param in zip(parts, self.segments, self.params, strict=True):
            if literal is None:
                if not part:
                    return None
                values[param or ""] = part
            elif part != literal:
                return None
        return values


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class Resolved:
    route: Route
    app: str | None
    action: str


class RouteTable:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._by_shape: dict[tuple[str, int], list[Route]] = {}
        for route in self.routes:
            self._by_shape.setdefault((route.method, len(route.segments)), []).append(route)
        # Literal routes first: `/apps/{app}/machines/{id}/lease` must not lose to a template.
        for bucket in self._by_shape.values():
            bucket.sort(key=lambda r: sum(1 for s in r.segments if s is None))

    def actions(self) -> set[str]:
        actions = {r.action for r in self.routes}
        actions.update(r.refine.action for r in self.routes if r.refine)
        return actions

    def produced_actions(self) -> list[ProducedAction]:
        """The actions requests can be decided on, for the policy's cross-reference check (routes
        that are always denied or answered by the gateway are never decided)."""
        return [ProducedAction(action, route.source) for route in self.routes
                if not route.deny_always and not route.answer_gateway
                for action in (route.action, *([route.refine.action] if route.refine else []))]

    def resolve(self, method: str, path: str) -> RouteMatch:
        parts = path.split("/")[1:]
        for route in self._by_shape.get((method, len(parts)), ()):
            params = route.match(parts)
            if params is not None:
                return RouteMatch(route, params)
        raise UnknownRoute(f"{method} {path} is not an operation this gateway knows; it is denied")

    @classmethod
    def load(cls, files: Iterable[Path]) -> RouteTable:
        routes: list[Route] = []
        seen: dict[tuple[str, str], str] = {}
        for file in files:
            for route in _load_file(file):
                key = (route.method, route.path)
                if key in seen:
                    raise ConfigError(f"{route.source}: {route.method} {route.path} is mapped twice (also {seen[key]})")
                seen[key] = route.source
                routes.append(route)
        return cls(routes)


def resolve_request(match: RouteMatch, query: bytes, body: bytes | None) -> Resolved:
    """The app and action of a matched request. Raises BadRequest or Forbidden."""
    route = match.route
    if route.deny_always:
        raise Forbidden(f"{route.method} {route.path} is always denied through the gateway: {route.reason}")
    app: str | None = None
    if route.app_source == "path":
        app = match.params[route.app_fields[0]]
    elif route.app_source == "body":
        app = _app_from_body(route, body)
    if app is not None and not APP_NAME.fullmatch(app):
        raise BadRequest(f"{app!r} is not a valid app name (lowercase letters, digits and '-')")
    action = route.action
    if route.refine is not None and _query_flag_set(query, route.refine.query):
        action = route.refine.action
    return Resolved(route, app, action)


def _query_flag_set(query: bytes, name: str) -> bool:
    # Fail closed: any spelling of the name with any value but a clear false refines the action.
    if not query:
        return False
    pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True)
    return any(key.lower() == name and value.lower() not in _FALSE for key, value in pairs)


def _app_from_body(route: Route, body: bytes | None) -> str:
    fields = " or ".join(repr(f) for f in route.app_fields)
    if not body:
        raise BadRequest(f"{route.method} {route.path} needs a JSON body with the app name in {fields}")
    document = load_strict(body, f"the body of {route.method} {route.path}")
    if not isinstance(document, dict):
        raise BadRequest(f"{route.method} {route.path} needs a JSON object body with {fields}")
    # Keys come back case folded: `Name` and `NAME` are `name` to the upstream too.
    given = [document[f.casefold()] for f in route.app_fields if f.casefold() in document]
    if not given:
        raise BadRequest(f"{route.method} {route.path} needs the app name in the body field {fields}")
    if not all(isinstance(name, str) for name in given):
        raise BadRequest(f"the app name in {fields} must be a string")
    if len(set(given)) > 1:
        raise BadRequest(f"the body gives different app names in {fields}; send one")
    return str(given[0])


def _load_file(file: Path) -> list[Route]:
    try:
        document = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"route file {file} does not exist (config key routes)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"route file {file} is not valid YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("routes"), list):
        raise ConfigError(f"route file {file} must be a mapping with a `routes:` list")
    routes = []
    for index, item in enumerate(document["routes"]):
        operation = item.get("operation", "?") if isinstance(item, dict) else "?"
        routes.append(_route_from(item, f"{file}: route {index} ({operation})"))
    return routes


_ROUTE_KEYS = {"operation", "method", "path", "action", "app", "refine", "deny", "answer", "filter", "remember",
               "reason", "body", "fields"}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _route_from(item: Any, where: str) -> Route:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: each route must be a mapping")
    unknown = set(item) - _ROUTE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_ROUTE_KEYS)}")
    for key in ("operation", "method", "path", "action", "app"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise ConfigError(f"{where}: `{key}` is required and must be a string")
    method = item["method"].upper()
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown method {item['method']!r}")
    path: str = item["path"]
    if not path.startswith("/") or "//" in path or path.endswith("/"):
        raise ConfigError(f"{where}: path {path!r} must start with '/', with no empty segments")
    segments: list[str | None] = []
    params: list[str | None] = []
    for part in path.split("/")[1:]:
        if part.startswith("{") and part.endswith("}"):
            segments.append(None)
            params.append(part[1:-1])
        else:
            segments.append(part)
            params.append(None)
    kind, _, spec = item["app"].partition(":")
    if kind == "body" and method not in _BODY_METHODS:
        raise ConfigError(f"{where}: a {method} request has no body to name the app in")
    app_fields: tuple[str, ...] = ()
    if kind in ("path", "org", "lookup") and spec in params:
        app_fields = (spec,)
    elif kind == "body" and spec:
        app_fields = tuple(spec.split("|"))
    elif kind != "none" or spec:
        raise ConfigError(
            f"{where}: app {item['app']!r} must be path:<param in the path>, body:<field>[|<field>], "
            "org:<param>, lookup:<param> or none")
    refine = None
    if "refine" in item:
        raw = item["refine"]
        if not isinstance(raw, dict) or set(raw) != {"query", "action"}:
            raise ConfigError(f"{where}: refine must be a mapping with query and action")
        refine = Refinement(str(raw["query"]).lower(), str(raw["action"]))
    deny = item.get("deny")
    if deny not in (None, "always"):
        raise ConfigError(f"{where}: deny must be `always` when present")
    answer = item.get("answer")
    if answer not in (None, "gateway"):
        raise ConfigError(f"{where}: answer must be `gateway` when present")
    remember = item.get("remember")
    if remember is not None and (not isinstance(remember, str) or kind != "body"):
        raise ConfigError(f"{where}: remember names the answer's object (e.g. release), on a route whose app is "
                          "in the body")
    filter_ = item.get("filter")
    if filter_ not in (None, "apps") or (filter_ == "apps" and kind != "none"):
        raise ConfigError(f"{where}: filter must be `apps`, on an org-level route (app: none)")
    body = item.get("body", "json" if method in _BODY_METHODS else "none")
    if body not in ("json", "none") or (body == "json" and method not in _BODY_METHODS):
        raise ConfigError(f"{where}: body must be `json` or `none` (only POST, PUT and PATCH take a body)")
    fields = item.get("fields")
    if fields is not None and (body != "json" or not isinstance(fields, list)
                               or not all(isinstance(f, str) and f for f in fields)):
        raise ConfigError(f"{where}: fields lists the request body's top-level field names, on a route with a body")
    return Route(
        operation=item["operation"], method=method, path=path, action=item["action"],
        app_source=_app_source(kind),
        app_fields=app_fields, segments=tuple(segments), params=tuple(params), refine=refine,
        deny_always=deny == "always", answer_gateway=answer == "gateway", filter_apps=filter_ == "apps",
        remember=remember,
        reason=str(item.get("reason", "")), source=where,
        takes_body=body == "json", fields=None if fields is None else frozenset(fields),
    )


def _app_source(kind: str) -> AppSource:
    sources: dict[str, AppSource] = {"path": "path", "body": "body", "org": "org", "lookup": "lookup"}
    return sources.get(kind, "none")
