"""The decision core's front door: who is asking, may they, and how often.

Every surface and the gateway's own API go through an `Authorizer`:

1. `authenticate`: the `Authorization` header values -> verified, registered, unrevoked `Claims`;
2. `decide`: the claims and the `Check`s a request needs (one `(app, action)` each; a GraphQL
   document may need several) -> a `Ruling`: allowed only if every check is, under one `Rules`;
3. `constraints`: what an allowed request's body must satisfy, under the same rules;
4. `rate_limit`: one request spent from the token's bucket.

It knows nothing about HTTP: surfaces turn requests into checks. Rules are replaced whole on a
reload (`install`); a request decided while a reload lands keeps the rules it started with for
its constraints, and its decision is not cached.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

from gateway.core.audit import AuditRecord, what_part, who_part
from gateway.core.constraints import Constraint
from gateway.core.decision_cache import CachedDecision, DecisionCache
from gateway.core.environments import EnvironmentResolver
from gateway.core.grants import EnvironmentOf, Grant
from gateway.core.keyring import Keyring
from gateway.core.policy import Decision, decide
from gateway.core.ratelimit import RateLimits
from gateway.core.registry import TokenRegistry
from gateway.core.rules import Rules
from gateway.core.tokens import Claims, TokenVerifier


@dataclass(frozen=True, slots=True)
class Check:
    """One thing a request does: `action` on `app` (None: the organization) in environment `env`.
    `org_filtered`: an org-level listing the surface filters down to the token's apps."""

    action: str
    app: str | None = None
    env: str | None = None
    org_filtered: bool = False


@dataclass(frozen=True, slots=True)
class Ruling:
    """A decision, the rules it was taken under, and each check's own decision (a request may need
    several): `check` is the check that decided, the refused one when refused."""

    decision: Decision
    rules: Rules
    generation: int
    decisions: tuple[tuple[Check, Decision], ...] = ()
    check: Check | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    def decision_for(self, check: Check) -> Decision | None:
        return next((decision for asked, decision in self.decisions if asked == check), None)


class Authorizer:
    rules: Rules  # set by `install` before the gateway serves (services.py)

    def __init__(self, verifier: TokenVerifier, registry: TokenRegistry, environments: EnvironmentResolver,
                 limits: RateLimits) -> None:
        self.verifier = verifier
        self.registry = registry
        self.environments = environments
        self.limits = limits
        self.decisions = DecisionCache()

    def install(self, rules: Rules) -> None:
        """Serve `rules` from now on (a reload): the decisions cached under the old ones are dropped
        now, and the roles new grants may name are the new policy's."""
        self.rules = rules
        self.decisions = DecisionCache()
        self.registry.known_roles = rules.policy.roles
        self.registry.role_includes = rules.policy.includes

    def install_keyring(self, keyring: Keyring) -> None:
        """Verify and mint with `keyring` from now on: a retired key stops verifying at once."""
        self.verifier.keyring = self.registry.issuer.keyring = keyring
        self.verifier.clear_cache()

    async def authenticate(self, authorization: list[bytes]) -> Claims:
        """The caller's verified, registered, unrevoked token claims; raises Unauthenticated."""
        claims = self.verifier.verify_authorization(authorization)
        await self.registry.check(claims)
        return claims

    def environment(self, app: str) -> str:
        return self.environments.resolve(app)

    def check(self, action: str, app: str | None, *, org_filtered: bool = False) -> Check:
        """The check of `action` on `app`, its environment resolved."""
        return Check(action, app, None if app is None else self.environments.resolve(app), org_filtered)

    def decide(self, claims: Claims, checks: Sequence[Check]) -> Ruling:
        """Allowed iff every check is (grants ∩ policy, DESIGN section 4); the first refusal otherwise."""
        return rule_on(claims.grants, claims.name, checks, self.rules, self.environments.resolve,
                       chain=claims.chain)

    def decide_gateway(self, claims: Claims, action: str) -> Ruling:
        """May the token perform `action` (gateway:*) on the gateway's own API?"""
        rules = self.rules
        decision = decide(claims.grants, rules.policy, app=None, env=None, action=action, token_name=claims.name,
                          env_of=self.environments.resolve, gateway_target=True)
        if claims.chain and decision.allowed:
            decision = _within_chain(claims.chain, claims.name, decision, rules, None, None, action,
                                     self.environments.resolve, gateway_target=True)
        return Ruling(decision, rules, rules.policy.generation)

    def constraints(self, ruling: Ruling, check: Check) -> tuple[Constraint, ...]:
        """The constraints an allowed check's body must satisfy (see `constraints_for`)."""
        return constraints_for(ruling, check)

    def cached(self, claims: Claims, key: Hashable) -> CachedDecision | None:
        """The allowing decision this token got for the request `key` under the current rules."""
        return self.decisions.get(self.rules, claims, key)

    def remember(self, claims: Claims, key: Hashable, ruling: Ruling, record: AuditRecord) -> None:
        """Keep an allowing ruling for `key` (under the rules still installed), with the audit parts
        a repeat writes: who from the claims, what from `record`'s request fields and the ruling."""
        if not ruling.allowed or ruling.rules is not self.rules or ruling.generation != self.rules.policy.generation:
            return  # refused, or the rules changed while this request was decided
        who = who_part(AuditRecord("", "", "", "", jti=claims.jti, sub=claims.sub, token_name=claims.name))
        what = what_part(AuditRecord("", "", record.method, record.path, record.action, app=record.app,
                                     env=record.env, decision="allow", reason=ruling.decision.reason))
        self.decisions.put(ruling.rules, ruling.generation, claims, key,
                           CachedDecision(claims, ruling.decision, who, what))

    async def rate_limit(self, claims: Claims) -> None:
        await self.limits.check(claims)

    @property
    def cache_hits(self) -> int:
        """Decisions served from a cache: whole requests (DecisionCache) and policy verdicts."""
        return self.decisions.hits + self.rules.policy.cache_hits


def rule_on(grants: tuple[Grant, ...], token_name: str, checks: Sequence[Check], rules: Rules,
            env_of: EnvironmentOf, *, chain: tuple[tuple[Grant, ...], ...] = ()) -> Ruling:
    """The decision for a token carrying `grants` (derived from tokens carrying each of `chain`):
    allowed iff every check is, under `rules`, for the token and for each of its ancestors. The
    request path (`Authorizer.decide`) and the dry runs (explain, `policy test`) both take it here."""
    generation = rules.policy.generation
    decided: list[tuple[Check, Decision]] = []
    for check in checks:
        decision = decide(grants, rules.policy, app=check.app, env=check.env, action=check.action,
                          token_name=token_name, env_of=env_of, org_filtered=check.org_filtered)
        if chain and decision.allowed:
            decision = _within_chain(chain, token_name, decision, rules, check.app, check.env, check.action, env_of,
                                     org_filtered=check.org_filtered)
        decided.append((check, decision))
        if not decision.allowed:
            return Ruling(decision, rules, generation, tuple(decided), check)
    if not decided:
        return Ruling(Decision(False, "the request names nothing this gateway can authorize"), rules, generation)
    if len(decided) == 1:
        return Ruling(decided[0][1], rules, generation, tuple(decided), decided[0][0])
    reason = "; ".join(dict.fromkeys(decision.reason for _, decision in decided))
    first = decided[0][1]
    return Ruling(Decision(True, reason, first.grant, first.rule), rules, generation, tuple(decided), decided[0][0])


def constraints_for(ruling: Ruling, check: Check) -> tuple[Constraint, ...]:
    """The constraints an allowed check's body must satisfy: those of the grant that allowed that
    very check, under the rules it was decided under, and, for a derived token, those of each
    ancestor's grant that allowed it too."""
    decision = ruling.decision_for(check)
    if decision is None:
        raise ValueError(f"{check} was not decided in this ruling")  # a surface's bug: fail closed
    if decision.grant is None or check.app is None or check.env is None:
        return ()
    applicable = ruling.rules.constraints.applicable
    own = applicable(decision.grant.role, check.env, check.action)
    if not decision.chain:
        return own
    every = list(own)
    for grant in decision.chain:
        every += [c for c in applicable(grant.role, check.env, check.action) if c not in every]
    return tuple(every)


def _within_chain(chain: tuple[tuple[Grant, ...], ...], token_name: str, decision: Decision, rules: Rules,
                  app: str | None, env: str | None, action: str, env_of: EnvironmentOf, *,
                  org_filtered: bool = False, gateway_target: bool = False) -> Decision:
    """`decision` (allowed) if every ancestor's grants in `chain` allow the same, else a refusal: a
    child never does more than the tokens it came from, whatever the policy says today."""
    allowing: list[Grant] = []
    for level, grants in enumerate(chain, start=1):
        ancestor = decide(grants, rules.policy, app=app, env=env, action=action, token_name=token_name,
                          env_of=env_of, org_filtered=org_filtered, gateway_target=gateway_target)
        if not ancestor.allowed or ancestor.grant is None:
            whose = "its parent" if level == 1 else f"its ancestor {level} levels up"
            return Decision(False, f"token '{token_name}' was derived from a token that does not allow this: "
                            f"{whose} ({', '.join(str(g) for g in grants)}) is refused {action} there; a derived "
                            "token never does more than the tokens it came from", None, ancestor.rule)
        allowing.append(ancestor.grant)
    return replace(decision, chain=tuple(allowing))
