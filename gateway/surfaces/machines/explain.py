"""Dry runs: would this token or grant set be allowed METHOD PATH, and why.

The same steps as the Machines API surface (canonicalize, resolve, decide), without a token check or a
forward, returning each intermediate answer so that a person can see where a request stops:
the route and action, the app and environment, the grant that covered it or why none did, and
the policy line that decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.core.environments import EnvironmentResolver
from gateway.core.grants import Grant
from gateway.core.policy import PolicyEngine, decide
from gateway.errors import BadRequest, GatewayError
from gateway.surfaces.paths import canonicalize
from gateway.surfaces.routes import RouteTable, resolve_request


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

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "status": self.status, "error": self.error, "reason": self.reason,
                "method": self.method, "path": self.path, "operation": self.operation, "action": self.action,
                "app": self.app, "env": self.env, "grant": self.grant, "rule": list(self.rule)}


def explain(grants: tuple[Grant, ...], method: str, target: str, body: bytes | None, *, routes: RouteTable,
            policy: PolicyEngine, environments: EnvironmentResolver, token_name: str = "explain") -> Explanation:
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
        decision = decide(grants, policy, app=app, env=env, action=action, token_name=token_name,
                          env_of=environments.resolve, org_filtered=resolved.route.filter_apps)
    except GatewayError as error:
        return Explanation(False, error.status, error.code, error.message, method, raw_path, operation, action,
                           app, env)
    return Explanation(decision.allowed, 200 if decision.allowed else 403, None if decision.allowed else "forbidden",
                       decision.reason, method, raw_path, operation, action, app, env,
                       str(decision.grant) if decision.grant else None, decision.rule)
