"""Caches of the request path: what a request line means, and which requests a token may make.

Every request is authorized from scratch in `proxy.py`; these caches only remember results of
pure functions, keyed by everything those results depend on, and are dropped whole when an
input changes or when they reach their bound (no per-entry bookkeeping on the hot path).

- `PlanCache`: (method, raw path, raw query as received) -> `Plan` (canonical target, resolved
  route/app/action, the app's environment). Depends on the route table and the environment
  rules; dropped when either object changes (a policy reload). Built only after the request
  passed canonicalization, the query-token check and route resolution; routes that read the
  app from the body, and targets over 1 KiB, are never planned. A plan looked up before
  authentication is used only if the route table is still the same after it.
- `AllowedCache`: (token, plan) -> `Allowed` (the allowing decision and the audit record's
  repeating parts, encoded once). Depends on the token's grants, the plan, the policy and the
  constraints; an entry is used only for the very `Claims` object it was built for (one per
  verified token) and only while the policy object, its generation and the constraint set are
  the ones it was built with. Requests that constraints apply to (they read the body) and
  denials are never cached. Revocation, expiry and rate limits are checked on every request,
  outside these caches. Dropped with the plans, so no entry keeps a dropped plan alive.

Worst case, both full of the largest entries they admit: ~10 MB of plans and ~20 MB of
entries (each holds a plan, the `Claims` and two short JSON fragments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.core.audit import fragment
from gateway.core.policy import Decision
from gateway.surfaces.paths import Target
from gateway.surfaces.routes import Resolved

if TYPE_CHECKING:
    from gateway.core.constraints import ConstraintSet
    from gateway.core.policy import EnvironmentResolver, PolicyEngine
    from gateway.core.tokens import Claims
    from gateway.state import GatewayState
    from gateway.surfaces.routes import RouteTable

PLAN_LIMIT = 4_096
PLAN_MAX_TARGET = 1_024  # longer targets (long queries) are resolved every time, never kept
ALLOWED_LIMIT = 8_192


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
        self.plans: dict[tuple[str, bytes, bytes], Plan] = {}
        self.generation = 0  # bumped whenever the plans are dropped: AllowedCache follows it
        self._routes: RouteTable | None = None
        self._environments: EnvironmentResolver | None = None

    def current(self, state: GatewayState) -> bool:
        """Are the plans still those of the state's route table and environment rules?"""
        return self._routes is state.routes and self._environments is state.environments

    def get(self, state: GatewayState, method: str, raw_path: bytes, raw_query: bytes) -> Plan | None:
        if not self.current(state):
            self._drop()
            self._routes, self._environments = state.routes, state.environments
            return None
        return self.plans.get((method, raw_path, raw_query))

    def put(self, state: GatewayState, plan: Plan) -> None:
        target = plan.target
        if not self.current(state) or len(target.raw_path) + len(target.raw_query) > PLAN_MAX_TARGET:
            return  # reloaded while this request was in flight, or too large to keep
        if len(self.plans) >= PLAN_LIMIT:
            self._drop()
        self.plans[(plan.method, target.raw_path, target.raw_query)] = plan

    def _drop(self) -> None:
        self.plans = {}
        self.generation += 1


@dataclass(frozen=True, slots=True, eq=False)
class Allowed:
    claims: Claims
    plan: Plan
    decision: Decision
    who: str  # audit fragment: jti, sub, token_name
    what: str  # audit fragment: method, path, action, app, env, decision, reason


class AllowedCache:
    def __init__(self, plans: PlanCache) -> None:
        self.entries: dict[tuple[str, Plan], Allowed] = {}
        self._plans = plans
        self._plan_generation = -1
        self._policy: PolicyEngine | None = None
        self._generation = -1
        self._constraints: ConstraintSet | None = None

    def get(self, state: GatewayState, claims: Claims, plan: Plan) -> Allowed | None:
        if not self._current(state):
            # Dropped with the plans too, so no entry keeps a dropped plan alive.
            self.entries = {}
            self._plan_generation = self._plans.generation
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
            return  # reloaded (or the plans dropped) while this request was in flight
        if len(self.entries) >= ALLOWED_LIMIT:
            self.entries = {}
        resolved = plan.resolved
        who = fragment(jti=claims.jti, sub=claims.sub, token_name=claims.name)
        what = fragment(method=plan.method, path=plan.path, action=resolved.action, app=resolved.app, env=plan.env,
                        decision="allow", reason=decision.reason)
        self.entries[(claims.jti, plan)] = Allowed(claims, plan, decision, who, what)

    def _current(self, state: GatewayState) -> bool:
        return (self._plan_generation == self._plans.generation and self._policy is state.policy
                and self._generation == state.policy.generation and self._constraints is state.constraints)
