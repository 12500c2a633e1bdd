"""The registry of live tokens: minting, checking and revoking, over the store.

A signature proves the gateway minted a token; the registry says whether it still lives. Every
request checks its token's jti here. Known records are cached in memory (bounded) and evicted
when the store's change feed names them, so a revocation made by another process (the CLI, or
another instance) is seen after at most one `sync` interval; a revocation made in this
process is seen at once.
"""

from __future__ import annotations

import difflib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gateway.core.grants import Grant, GrantError, parse_grants
from gateway.core.ratelimit import DerivationLimit
from gateway.core.sized_cache import SizedLRU, str_bytes
from gateway.core.tokens import DEFAULT_CACHE_BYTES, Claims, TokenIssuer, claims_bytes, grant_bytes
from gateway.durations import format_duration
from gateway.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    RateLimited,
    StateUnavailable,
    Unauthenticated,
    Unprocessable,
)
from gateway.store import TokenRecord, TokenStore

Status = tuple[Claims, str | None, int]
MAX_DEPTH = 8  # levels of attenuation below a root token (the chain claim grows with each)


@dataclass(frozen=True)
class MintedToken:
    token: str
    record: TokenRecord


class TokenRegistry:
    def __init__(self, store: TokenStore, issuer: TokenIssuer, *, known_roles: Callable[[], set[str]],
                 environments: frozenset[str], default_ttl_s: int, max_ttl_s: int,
                 max_children: int | None = None, derivations: DerivationLimit | None = None,
                 clock: Callable[[], float] = time.time, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.store = store
        self.issuer = issuer
        self.known_roles = known_roles
        # Does a role include another (policy inheritance)? Attenuation may narrow the role by it.
        self.role_includes: Callable[[str, str], bool] = lambda role, other: role == other
        self.environments = environments  # what the environment rules can produce: env grants name one
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.max_children = max_children  # live tokens derived from one root token, at most
        self.derivations = derivations  # how fast tokens may be derived (attenuation, exchange)
        self.clock = clock
        # jti -> (the claims checked against the record, why they are refused or None, record exp),
        # bounded by memory (config `limits.token_cache_mb`), least recently used out. The key is
        # the claims' own jti string and the claims are usually the verified-token cache's, but
        # each entry is charged for them all the same: the bound holds whatever the other cache does.
        self._status: SizedLRU[str, Status] = SizedLRU(cache_bytes, _status_bytes)
        self._cursor = "0"
        self._last_used: dict[str, int] = {}
        # Fail closed while the store is known to be down (set by the sync loop), and trust
        # cached records only for `lease_s` after the change feed was last read (None: always,
        # for a registry nobody syncs, e.g. the CLI's).
        self.unavailable: str | None = None
        self.lease_s: float | None = None
        self._fresh_until = 0.0
        self._generation = 0  # bumped whenever cached records are dropped

    # --- minting and administration ------------------------------------------------------------

    def validate_grants(self, texts: list[str]) -> tuple[Grant, ...]:
        try:
            grants = parse_grants(texts)
        except GrantError as exc:
            raise BadRequest(str(exc)) from None
        roles = self.known_roles()
        for grant in grants:
            problem = unknown_name(grant, roles, self.environments)
            if problem is not None:
                raise BadRequest(problem)
            if (grant.kind == "gateway") != (grant.role == "token-admin"):
                raise BadRequest(f"grant {grant}: token-admin goes with scope gateway, and only token-admin does")
        return grants

    def ttl(self, ttl_s: int | None) -> int:
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise BadRequest("ttl must be positive, e.g. 15m, 1h or 30d")
        if ttl > self.max_ttl_s:
            raise BadRequest(f"ttl {format_duration(ttl)} is longer than tokens.max_ttl "
                             f"({format_duration(self.max_ttl_s)}); no token lives forever")
        return ttl

    async def mint(self, *, grants: list[str], ttl_s: int | None, name: str, subject: str,
                   parent: str | None = None, root: str | None = None, rotated_from: str | None = None,
                   cap: bool = False, chain: tuple[tuple[Grant, ...], ...] = ()) -> MintedToken:
        """A new token; with `parent`, only while that parent lives (checked by the store in the same
        step as the write) and, with `cap`, while its lineage `root` is under `max_children`."""
        parsed = self.validate_grants(grants)
        ttl = self.ttl(ttl_s)
        if not name.strip() or len(name) > 128:
            raise BadRequest("name must be 1 to 128 characters")
        if not subject.strip() or len(subject) > 256:
            raise BadRequest("subject must be 1 to 256 characters")
        token, claims = self.issuer.mint(sub=subject, name=name, grants=parsed, ttl_s=ttl, parent=parent, root=root,
                                         chain=chain)
        record = TokenRecord(jti=claims.jti, sub=claims.sub, name=claims.name, grants=tuple(claims.grant_strings()),
                             iat=claims.iat, exp=claims.exp, parent=parent, root=root, rotated_from=rotated_from,
                             chain=_chain_text(chain))
        if parent is None:
            await self.store.put(record)
        else:
            problem = await self.store.put_derived(record, now=int(self.clock()),
                                                   max_live=self.max_children if cap else None)
            if problem is not None:
                raise self._refusal(problem, parent, root)
        return MintedToken(token, record)

    def _refusal(self, problem: str, parent: str, root: str | None) -> Exception:
        if problem == "full":
            return RateLimited(f"the tokens derived from token {root} already number tokens.max_children "
                               f"({self.max_children}) live ones; revoke some or let them expire "
                               "before attenuating again", retry_after_s=60)
        if problem == "outlives":
            return Forbidden(f"a child token cannot outlive its parent {parent}; ask for a shorter ttl")
        state = {"missing": "is not registered", "revoked": "has been revoked", "expired": "has expired"}
        return Unauthenticated(f"the parent token {parent} {state.get(problem, 'is not live')}; "
                               "nothing was minted from it")

    async def show(self, jti: str) -> TokenRecord:
        record = await self.store.get(jti)
        if record is None:
            raise NotFound(f"no token with jti {jti!r}; `scopegate token list` shows the known ones")
        return record

    async def revoke(self, jti: str, *, reason: str | None) -> list[str]:
        await self.show(jti)
        revoked = await self.store.revoke(jti, reason=reason, at=int(self.clock()))
        self._generation += 1
        for item in revoked:
            self._status.pop(item)
        return revoked

    async def rotate(self, jti: str, *, grace_s: int) -> MintedToken:
        """A new token with the same grants, subject, name and lifetime; the old one dies after `grace_s`."""
        old = await self.show(jti)
        now = int(self.clock())
        if old.revoked_at is not None:
            # 422, not 400: the request is well-formed, the token named cannot be rotated (the CLI
            # exits 1, an operation that failed, not 2, a usage error).
            raise Unprocessable(f"token {jti} is revoked; mint a new one instead of rotating it")
        if old.exp <= now:
            raise Unprocessable(f"token {jti} has expired; mint a new one instead of rotating it")
        if grace_s < 0 or grace_s > self.max_ttl_s:
            raise BadRequest("grace must be between 0s and tokens.max_ttl")
        lifetime = min(old.exp - old.iat, self.max_ttl_s)
        # The successor takes the old token's place in its lineage (same parent, same root, decided
        # under the same ancestors' grants, ending no later than its parent): it is not derived from
        # the old token, so revoking the old one (it leaked) leaves it alive.
        chain: list[tuple[Grant, ...]] = []
        ancestor = old.parent
        while ancestor is not None and len(chain) <= MAX_DEPTH:
            record = await self.show(ancestor)
            if not chain:
                lifetime = min(lifetime, record.exp - now)
            chain.append(tuple(parse_grants(list(record.grants))))
            ancestor = record.parent
        minted = await self.mint(grants=list(old.grants), ttl_s=lifetime, name=old.name, subject=old.sub,
                                 parent=old.parent, root=old.root, rotated_from=jti, chain=tuple(chain))
        await self.store.shorten(jti, exp=now + grace_s)
        self._generation += 1
        self._status.pop(jti)
        return minted

    async def attenuate(self, parent: Claims, *, grants: list[str], ttl_s: int | None, name: str | None,
                        env_of: Callable[[str], str]) -> MintedToken:
        """A child of `parent` with a subset of its grants and a life that ends no later than the parent's."""
        requested = self.validate_grants(grants)
        for grant in requested:
            if not any(_narrows(grant, held, env_of, self.role_includes) for held in parent.grants):
                raise Forbidden(f"grant {grant} is not within the token's own grants "
                                f"({', '.join(parent.grant_strings())}); a child can only narrow them: the same "
                                "or a narrower scope, the same role or one the policy says it includes")
        if len(parent.chain) >= MAX_DEPTH:
            raise Forbidden(f"tokens are derived at most {MAX_DEPTH} levels deep; attenuate from a token nearer "
                            "its root")
        if self.derivations is not None:
            await self.derivations.take(parent.lineage, f"token '{parent.name}' (with the tokens of its lineage)")
        record = await self.show(parent.jti)
        now = int(self.clock())
        if record.revoked_at is not None:
            # The caller's check passed on a cached status the change feed has not yet replaced.
            raise Unauthenticated(f"token '{parent.name}' has been revoked; nothing was minted from it")
        remaining = min(parent.exp, record.exp) - now
        ttl = ttl_s if ttl_s is not None else min(self.default_ttl_s, remaining)
        if ttl > remaining:
            raise Forbidden(f"a child token cannot outlive its parent ({format_duration(max(remaining, 1))} left)")
        return await self.mint(grants=[str(g) for g in requested], ttl_s=ttl, name=name or f"{parent.name}/child",
                               subject=parent.sub, parent=parent.jti, root=parent.lineage, cap=True,
                               chain=(parent.grants, *parent.chain))

    # --- the hot path --------------------------------------------------------------------------

    async def check(self, claims: Claims, *, use: bool = True) -> None:
        """Raises Unauthenticated unless the token's record exists, is not revoked and not cut short;
        StateUnavailable while the store is down, even for a record in the cache. `use`: the token
        is being used (its `last_used_at` moves); False when it is only asked about (explain)."""
        if self.unavailable is not None:
            raise StateUnavailable(self.unavailable)
        status = self._status.entries.get(claims.jti)  # SizedLRU.get, inline (every request's path)
        if status is not None:
            self._status.entries.move_to_end(claims.jti)
        if (status is None or (status[0] is not claims and status[0] != claims)
                or (self.lease_s is not None and time.monotonic() > self._fresh_until)):
            generation = self._generation
            record = await self.store.get(claims.jti)
            if record is None:
                raise Unauthenticated(f"token '{claims.name}' is not registered with this gateway "
                                      "(was it minted for another store?); ask for a new one")
            exp = claims.exp if record.exp == claims.exp else record.exp  # one int object when they agree
            status = (claims, _refusal_of(claims, record), exp)
            # A change that arrived while the store was being read may postdate what was read:
            # then the answer serves this request but is not cached.
            if generation == self._generation:
                self._remember(claims.jti, status)
        refused, not_after = status[1], status[2]
        if refused is not None:
            raise Unauthenticated(refused)
        now = int(self.clock())
        if now >= not_after:
            raise Unauthenticated(f"token '{claims.name}' has expired (rotated, or past its lifetime); "
                                  "use its replacement")
        if use:
            self._last_used[claims.jti] = now

    def _remember(self, jti: str, status: Status) -> None:
        self._status.put(jti, status)

    def forget_all(self) -> None:
        self._generation += 1
        self._status.clear()

    @property
    def cursor(self) -> str:
        """Where in the store's change feed the last `sync` stopped."""
        return self._cursor

    def mark_unavailable(self, reason: str) -> None:
        """The store failed: refuse (503) every check until a `sync` succeeds again."""
        self.unavailable = reason
        self.forget_all()

    async def start(self) -> None:
        self._cursor = await self.store.current_cursor()
        self._fresh_until = time.monotonic() + (self.lease_s or 0.0)

    async def sync(self) -> None:
        """Drop cached records the change feed names, and record last use."""
        cursor, changed = await self.store.changes_since(self._cursor)
        if changed is None:
            self.forget_all()
        elif changed:
            self._generation += 1
            for jti in changed:
                self._status.pop(jti)
        self._cursor = cursor
        self.unavailable = None
        self._fresh_until = time.monotonic() + (self.lease_s or 0.0)
        if self._last_used:
            pending, self._last_used = self._last_used, {}
            await self.store.touch(pending)


def _status_bytes(status: Status) -> int:
    # The grants too: the verifier's shared pool may be full or cleared (a keyring reload), and a
    # token may carry hundreds of its own; this bound must hold whatever the verifier keeps.
    claims, refused, exp = status
    return (sys.getsizeof(status) + claims_bytes(claims) + sum(grant_bytes(grant) for grant in claims.grants)
            + str_bytes(refused) + (0 if exp is claims.exp else sys.getsizeof(exp)))


def _refusal_of(claims: Claims, record: TokenRecord) -> str | None:
    """Why a token whose signature is good is refused all the same: revoked, or its claims are not
    what was registered when it was minted (defence in depth: a signing key that leaked could mint
    a token under a registered jti with other grants; the store's record says what was minted)."""
    if record.revoked_at is not None:
        return f"token '{claims.name}' has been revoked; ask for a new one"
    if (tuple(claims.grant_strings()) != record.grants or claims.sub != record.sub or claims.name != record.name
            or claims.iat != record.iat or claims.exp < record.exp or claims.parent != record.parent
            or claims.root != record.root or _chain_text(claims.chain) != record.chain):
        return (f"token '{claims.name}' does not match the record this gateway keeps of it (grants, subject, "
                "lineage or ancestors' grants differ); it was not minted as presented; ask for a new one")
    return None


def _chain_text(chain: tuple[tuple[Grant, ...], ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(str(grant) for grant in level) for level in chain)


def _narrows(child: Grant, held: Grant, env_of: Callable[[str], str],
             includes: Callable[[str, str], bool]) -> bool:
    # The same role or one the held role includes under the policy (a role it inherits); the
    # same scope or a narrower one (a literal app inside an env grant narrows it). A lesser role
    # may carry deny lines the held one lacks, or the policy may change: every request of the
    # child is also decided under each ancestor's grants (Claims.chain), so a child never does
    # more than its parent whatever the policy.
    if not includes(held.role, child.role):
        return False
    child = replace(child, role=held.role)
    if child.within(held, env_of):
        return True
    return (child.kind == "app" and held.kind == "env"
            and not any(c in child.pattern for c in "*?") and env_of(child.pattern) == held.pattern)


def unknown_name(grant: Grant, roles: set[str], environments: frozenset[str]) -> str | None:
    """What is wrong with a grant naming a role the policy lacks or an environment no app is in
    (a typo such as `env:produciton` would grant nothing, silently); None when both exist."""
    if grant.role not in roles:
        return (f"grant {grant}: role {grant.role!r} is not in the policy{did_you_mean(grant.role, roles)}; "
                f"known roles: {', '.join(sorted(roles))}")
    if grant.kind == "env" and grant.pattern not in environments:
        return (f"grant {grant}: environment {grant.pattern!r} is not one the environment rules produce"
                f"{did_you_mean(grant.pattern, environments)}; known environments: {', '.join(sorted(environments))}")
    return None


def did_you_mean(given: str, known: set[str] | frozenset[str]) -> str:
    """` (did you mean 'x'?)` for the closest known name, or nothing: for messages about typos."""
    close = difflib.get_close_matches(given, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
