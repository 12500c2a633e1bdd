"""Decisions that repeat: (token, request) -> the allowing decision, with its audit parts encoded.

A token that makes the same request again (the same surface request key: for the Machines API, the
same method and target) gets the same answer as long as the rules are the same, so the decision
and the parts of its audit line that repeat (audit.who_part, audit.what_part) are kept. Only
allowing decisions are kept, never for requests that constraints apply to (they read the body).

An entry serves only the very `Claims` object it was built for (one per verified token), only
under the rules object and policy generation it was built under, and the whole cache is dropped
when either changes or when it reaches its bound. Revocation, expiry and rate limits are checked
on every request, outside this cache.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from gateway.core.policy import Decision
from gateway.core.rules import Rules
from gateway.core.tokens import Claims

DECISION_LIMIT = 8_192


@dataclass(frozen=True, slots=True, eq=False)
class CachedDecision:
    claims: Claims
    decision: Decision
    who: str  # audit part: jti, sub, token_name
    what: str  # audit part: method, path, action, app, env, decision, reason


class DecisionCache:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, Hashable], CachedDecision] = {}
        self.hits = 0
        self._rules: Rules | None = None
        self._generation = -1

    def get(self, rules: Rules, claims: Claims, key: Hashable) -> CachedDecision | None:
        if self._rules is not rules or self._generation != rules.policy.generation:
            # New rules (or the policy reloaded in place): nothing cached counts, hits count anew.
            self.entries = {}
            self.hits = 0
            self._rules, self._generation = rules, rules.policy.generation
            return None
        entry = self.entries.get((claims.jti, key))
        if entry is None or entry.claims is not claims:
            return None
        self.hits += 1
        return entry

    def put(self, rules: Rules, generation: int, claims: Claims, key: Hashable, entry: CachedDecision) -> None:
        """Keep `entry`, decided under `rules` at `generation`, if those are the rules this cache serves."""
        if rules is not self._rules or generation != self._generation:
            return  # decided under other rules than the cache's
        if len(self.entries) >= DECISION_LIMIT:
            self.entries = {}
        self.entries[(claims.jti, key)] = entry
