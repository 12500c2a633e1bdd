"""Dry runs: would this token or grant set be allowed METHOD PATH (with this body), and why.

The same steps as the Machines API surface (canonicalize, resolve, decide, then the request-body
constraints), through the same decision (`core.authorizer.rule_on`, `constraints_for`), without
a token check or a forward, returning each intermediate answer so that a person can see where a
request stops: the route and action, the app and environment, the grant that covered it or why
none did, the policy line that decided, and the constraints that applied (and the one that
refused). A dry run asks nothing upstream: a constraint that needs the upstream's answer (whether
a volume belongs to the app) is not taken as passed, and the explanation says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gateway.core.authorizer import Check, constraints_for, rule_on
from gateway.core.constraints import Constraint, VolumeOwnership, enforce
from gateway.core.environments import EnvironmentResolver
from gateway.core.grants import Grant
from gateway.core.rules import Rules
from gateway.errors import BadRequest, GatewayError
from gateway.surfaces.machines.bodies import check_placement, read_document
from gateway.surfaces.paths import canonicalize
from gateway.surfaces.routes import Route, RouteTable, resolve_request


@dataclass(frozen=True)
class Explanation:
    allowed: bool
    status: int
    error: str | None
    reason: str
    method: str
    path: str
    operation: str | None = None
    action: str | None = None
    app: str | None = None
    env: str | None = None
    grant: str | None = None
    rule: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()  # the constraints that applied to the body, in order
    constraint: str | None = None  # the one that refused it (or could not be judged in a dry run)

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "status": self.status, "error": self.error, "reason": self.reason,
                "method": self.method, "path": self.path, "operation": self.operation, "action": self.action,
                "app": self.app, "env": self.env, "grant": self.grant, "rule": list(self.rule),
                "constraints": list(self.constraints), "constraint": self.constraint}


class _AsksUpstream(Exception):
    """A constraint wanted the upstream's answer, which a dry run does not ask."""

    def __init__(self, what: str, ident: str, app: str) -> None:
        super().__init__(f"whether {what} {ident!r} belongs to app {app}")


async def _volume(app: str, volume: str) -> bool:
    raise _AsksUpstream("volume", volume, app)


async def _snapshot(app: str, snapshot: str) -> bool:
    raise _AsksUpstream("snapshot", snapshot, app)


DRY_RUN_OWNERSHIP = VolumeOwnership(_volume, _snapshot)


async def explain(grants: tuple[Grant, ...], method: str, target: str, body: bytes | None, *, routes: RouteTable,
                  rules: Rules, environments: EnvironmentResolver, org_slug: str | None,
                  token_name: str = "explain", chain: tuple[tuple[Grant, ...], ...] = ()) -> Explanation:
    """The request path's decision for `method target` with `body`, for a token carrying `grants`
    (derived from tokens carrying each of `chain`), without asking anything upstream."""
    method = method.upper()
    raw_path, _, raw_query = target.partition("?")
    operation = action = app = env = None
    try:
        try:
            encoded_path, encoded_query = raw_path.encode("utf-8"), raw_query.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("path is not valid Unicode text") from None
        canonical = canonicalize(encoded_path, encoded_query)
        match = routes.resolve(method, canonical.path)
        operation = match.route.operation
        action = match.route.action
        resolved = resolve_request(match, canonical.raw_query, body if match.route.needs_body else None)
        action, app = resolved.action, resolved.app
        env = environments.resolve(app) if app is not None else None
        if resolved.route.answer_gateway:
            return Explanation(True, 200, None, "answered by the gateway about the caller's own token", method,
                               raw_path, operation, action, app, env)
        check = Check(action, app, env, resolved.route.filter_apps)
        ruling = rule_on(grants, token_name, [check], rules, environments.resolve, chain=chain)
    except GatewayError as error:
        return Explanation(False, error.status, error.code, error.message, method, raw_path, operation, action,
                           app, env)
    decision = ruling.decision
    explained = Explanation(decision.allowed, 200 if decision.allowed else 403,
                            None if decision.allowed else "forbidden", decision.reason, method, raw_path, operation,
                            action, app, env, str(decision.grant) if decision.grant else None, decision.rule)
    if not decision.allowed or app is None:
        return explained
    return await _constrain(explained, constraints_for(ruling, check), app, body, resolved.route, org_slug)


async def _constrain(explained: Explanation, constraints: tuple[Constraint, ...], app: str,
                     body: bytes | None, route: Route, org_slug: str | None) -> Explanation:
    """The allowed decision, narrowed as the request path narrows it (machines/surface.py
    `judge_body`): the body read strictly, its placement (organization, network), then the body
    constraints in order, one at a time so that the one that refuses is named."""
    names = tuple(c.name for c in constraints)
    try:
        document = read_document(route, body, judged=bool(constraints)) if body else None
        check_placement(document, org_slug)
    except GatewayError as error:
        return replace(explained, allowed=False, status=error.status, error=error.code, reason=error.message,
                       constraints=names)
    if not constraints:
        return explained
    document = {} if document is None else document
    for constraint in constraints:
        try:
            await enforce((constraint,), app=app, document=document, ownership=DRY_RUN_OWNERSHIP)
        except GatewayError as error:
            return replace(explained, allowed=False, status=error.status, error=error.code, reason=error.message,
                            constraints=names, constraint=constraint.name)
        except _AsksUpstream as asked:
            reason = (f"constraint '{constraint.name}' asks the upstream {asked}; a dry run asks nothing upstream, "
                      "so it does not say allowed (the real request is decided by the upstream's answer)")
            return replace(explained, allowed=False, status=403, error="forbidden", reason=reason,
                            constraints=names, constraint=constraint.name)
    passed = ", ".join(f"'{name}'" for name in names)
    return replace(explained, reason=f"{explained.reason}; the body passes constraint(s) {passed}", constraints=names)

