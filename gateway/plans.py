"""Caches of the request path: what a request line means, and which requests a token may make.

Every request is authorized from scratch in `proxy.py`; these caches only remember results of
pure functions, keyed by everything those results depend on, and are dropped whole when an
input changes or when they reach their bound (no per-entry bookkeeping on the hot path).

- `PlanCache`: (method, request target as received) -> `Plan` (canonical target, resolved
  route/app/action, the app's environment). Depends on the route table and the environment
  rules; dropped when either object changes (a policy reload). Built only after the request
  passed canonicalization, the query-token check and route resolution; routes that read the
  app from the body are never planned.
- `AllowedCache`: (token, plan) -> `Allowed` (the allowing decision and the audit record's
  repeating parts, encoded once). Depends on the token's grants, the plan, the policy and the
  constraints; an entry is used only for the very `Claims` object it was built for (one per
  verified token) and only while the policy object, its generation and the constraint set are
  the ones it was built with. Requests that constraints apply to (they read the body) and
  denials are never cached. Revocation, expiry and rate limits are checked on every request,
  outside these caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.audit import fragment
from gateway.paths import Target
from gateway.policy import Decision
from gateway.routes import Resolved

if TYPE_CHECKING:
    from gateway.constraints import ConstraintSet
    from gateway.policy import EnvironmentResolver, PolicyEngine
    from gateway.routes import RouteTable
    from gateway.state import GatewayState
    from gateway.tokens import Claims

PLAN_LIMIT = 16_384
ALLOWED_LIMIT = 16_384


@dataclass(frozen=True, slots=True, eq=False)  # identity: a key of AllowedCache
class Plan:
    """What a request line means, worked out once."""

    method: str
    target: Target
    path: str  # the audit record's path
    resolved: Resolved
    env: str | None


class PlanCache:
    def __init__(self) -> None:
        self.plans: dict[tuple[str, bytes], Plan] = {}
        self._routes: RouteTable | None = None
        self._environments: EnvironmentResolver | None = None

    def get(self, state: GatewayState, method: str, raw_target: bytes) -> Plan | None:
        if self._routes is not state.routes or self._environments is not state.environments:
            self.plans = {}
            self._routes, self._environments = state.routes, state.environments
            return None
        return self.plans.get((method, raw_target))

    def put(self, state: GatewayState, raw_target: bytes, plan: Plan) -> None:
        if self._routes is not state.routes or self._environments is not state.environments:
            return  # reloaded while this request was in flight: its plan may be stale
        if len(self.plans) >= PLAN_LIMIT:
            self.plans = {}
        self.plans[(plan.method, raw_target)] = plan


@dataclass(frozen=True, slots=True, eq=False)
class Allowed:
    claims: Claims
    plan: Plan
    decision: Decision
    who: str  # audit fragment: jti, sub, token_name
    what: str  # audit fragment: method, path, action, app, env, decision, reason


class AllowedCache:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, Plan], Allowed] = {}
        self._policy: PolicyEngine | None = None
        self._generation = -1
        self._constraints: ConstraintSet | None = None

    def get(self, state: GatewayState, claims: Claims, plan: Plan) -> Allowed | None:
        if not self._current(state):
            self.entries = {}
            self._policy, self._generation, self._constraints = state.policy, state.policy.generation, \
                state.constraints
            return None
        entry = self.entries.get((claims.jti, plan))
        if entry is None or entry.claims is not claims:
            return None
        state.policy.cache_hits += 1  # a decision served from a cache (scopegate_decision_cache_hits)
        return entry

    def put(self, state: GatewayState, claims: Claims, plan: Plan, decision: Decision) -> None:
        if not self._current(state):
            return  # reloaded while this request was in flight
        if len(self.entries) >= ALLOWED_LIMIT:
            self.entries = {}
        resolved = plan.resolved
        who = fragment(jti=claims.jti, sub=claims.sub, token_name=claims.name)
        what = fragment(method=plan.method, path=plan.path, action=resolved.action, app=resolved.app, env=plan.env,
                        decision="allow", reason=decision.reason)
        self.entries[(claims.jti, plan)] = Allowed(claims, plan, decision, who, what)

    def _current(self, state: GatewayState) -> bool:
        return (self._policy is state.policy and self._generation == state.policy.generation
                and self._constraints is state.constraints)
