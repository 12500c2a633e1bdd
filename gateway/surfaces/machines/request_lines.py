"""What a Machines API request line means, worked out once: `RequestLine`, and a cache of them.

(method, raw path, raw query as received) -> the canonical target, the matched route, the app and
action, and the check the decision core answers. It depends only on the route table and the
environment rules, so the cache is dropped whole when either object changes (a reload) and when
it reaches its bound. A line is cached only after it passed canonicalization and resolution;
routes that read the app from the body, and targets over 1 KiB, are never cached. A line looked
up before authentication is used only if the route table is still the same after it.

The `RequestLine` object is also the key of the decision cache (core/decision_cache.py): a token
that repeats a request line gets the decision it got the first time.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.authorizer import Check
from gateway.core.environments import EnvironmentResolver
from gateway.surfaces.paths import Target
from gateway.surfaces.routes import Resolved, RouteTable

LINE_LIMIT = 4_096
LINE_MAX_TARGET = 1_024  # longer targets (long queries) are resolved every time, never kept


@dataclass(frozen=True, slots=True, eq=False)  # identity: a key of the decision cache
class RequestLine:
    method: str
    target: Target
    path: str  # the audit record's path
    resolved: Resolved
    check: Check

    @property
    def cacheable(self) -> bool:
        """Only lines whose meaning is the target's alone: not an app from the body or the store."""
        return self.resolved.route.app_source in ("path", "none") and \
            len(self.target.raw_path) + len(self.target.raw_query) <= LINE_MAX_TARGET


class RequestLineCache:
    def __init__(self) -> None:
        self.lines: dict[tuple[str, bytes, bytes, bool], RequestLine] = {}
        self._routes: RouteTable | None = None
        self._environments: EnvironmentResolver | None = None

    def current(self, routes: RouteTable, environments: EnvironmentResolver) -> bool:
        """Are the cached lines still those of this route table and these environment rules?"""
        return self._routes is routes and self._environments is environments

    def get(self, routes: RouteTable, environments: EnvironmentResolver, method: str, raw_path: bytes,
            raw_query: bytes, has_query: bool) -> RequestLine | None:
        if not self.current(routes, environments):
            self.lines = {}
            self._routes, self._environments = routes, environments
            return None
        return self.lines.get((method, raw_path, raw_query, has_query))

    def put(self, routes: RouteTable, environments: EnvironmentResolver, line: RequestLine) -> None:
        if not line.cacheable or not self.current(routes, environments):
            return  # too large to keep, or reloaded while this request was in flight
        if len(self.lines) >= LINE_LIMIT:
            self.lines = {}
        target = line.target
        self.lines[(line.method, target.raw_path, target.raw_query, target.has_query)] = line
