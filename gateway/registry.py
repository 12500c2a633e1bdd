"""The registry of live tokens: minting, checking and revoking, over the store.

A signature proves the gateway minted a token; the registry says whether it still lives. Every
request checks its token's jti here. Known records are cached in memory (bounded) and evicted
when the store's change feed names them, so a revocation made by another process (the CLI, or
another instance) is seen after at most one `sync` interval; a revocation made in this
process is seen at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.durations import format_duration
from gateway.errors import BadRequest, NotFound, Unauthenticated
from gateway.grants import Grant, GrantError, parse_grants
from gateway.store import TokenRecord, TokenStore
from gateway.tokens import Claims, TokenIssuer

_CACHE_LIMIT = 100_000


@dataclass(frozen=True)
class MintedToken:
    token: str
    record: TokenRecord


class TokenRegistry:
    def __init__(self, store: TokenStore, issuer: TokenIssuer, *, known_roles: Callable[[], set[str]],
                 default_ttl_s: int, max_ttl_s: int, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.issuer = issuer
        self.known_roles = known_roles
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.clock = clock
        self._revoked: OrderedDict[str, bool] = OrderedDict()  # jti -> revoked?
        self._cursor = "0"
        self._last_used: dict[str, int] = {}

    # --- minting and administration ------------------------------------------------------------

    def validate_grants(self, texts: list[str]) -> tuple[Grant, ...]:
        try:
            grants = parse_grants(texts)
        except GrantError as exc:
            raise BadRequest(str(exc)) from None
        roles = self.known_roles()
        for grant in grants:
            if grant.role not in roles:
                raise BadRequest(f"grant {grant}: role {grant.role!r} is not in the policy; known roles: "
                                 f"{', '.join(sorted(roles))}")
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
                   parent: str | None = None) -> MintedToken:
        parsed = self.validate_grants(grants)
        ttl = self.ttl(ttl_s)
        if not name.strip() or len(name) > 128:
            raise BadRequest("name must be 1 to 128 characters")
        if not subject.strip() or len(subject) > 256:
            raise BadRequest("subject must be 1 to 256 characters")
        token, claims = self.issuer.mint(sub=subject, name=name, grants=parsed, ttl_s=ttl, parent=parent)
        record = TokenRecord(jti=claims.jti, sub=claims.sub, name=claims.name, grants=tuple(claims.grant_strings()),
                             iat=claims.iat, exp=claims.exp, parent=parent)
        await self.store.put(record)
        return MintedToken(token, record)

    async def show(self, jti: str) -> TokenRecord:
        record = await self.store.get(jti)
        if record is None:
            raise NotFound(f"no token with jti {jti!r}; `scopegate token list` shows the known ones")
        return record

    async def revoke(self, jti: str, *, reason: str | None) -> list[str]:
        await self.show(jti)
        revoked = await self.store.revoke(jti, reason=reason, at=int(self.clock()))
        for item in revoked:
            self._remember(item, True)
        return revoked

    # --- the hot path --------------------------------------------------------------------------

    async def check(self, claims: Claims) -> None:
        """Raises Unauthenticated unless the token's record exists and is not revoked."""
        revoked = self._revoked.get(claims.jti)
        if revoked is None:
            record = await self.store.get(claims.jti)
            if record is None:
                raise Unauthenticated(f"token '{claims.name}' is not registered with this gateway "
                                      "(was it minted for another store?); ask for a new one")
            revoked = record.revoked_at is not None
            self._remember(claims.jti, revoked)
        if revoked:
            raise Unauthenticated(f"token '{claims.name}' has been revoked; ask for a new one")
        self._last_used[claims.jti] = int(self.clock())

    def _remember(self, jti: str, revoked: bool) -> None:
        self._revoked[jti] = revoked
        if len(self._revoked) > _CACHE_LIMIT:
            self._revoked.popitem(last=False)

    def forget_all(self) -> None:
        self._revoked.clear()

    async def start(self) -> None:
        self._cursor = await self.store.current_cursor()

    async def sync(self) -> None:
        """Drop cached records the change feed names, and record last use."""
        cursor, changed = await self.store.changes_since(self._cursor)
        if changed is None:
            self._revoked.clear()
        else:
            for jti in changed:
                self._revoked.pop(jti, None)
        self._cursor = cursor
        if self._last_used:
            pending, self._last_used = self._last_used, {}
            await self.store.touch(pending)
