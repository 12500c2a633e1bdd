"""Per-token rate limits: a token bucket per jti, with per-role limits.

A `Bucket` keeps one bucket per key: `LocalBuckets` in this process (the SQLite deployment: one
instance), or the store's shared one (`TokenStore.rate_buckets`: Redis, so that instances share one
bucket per token). `RateLimits` picks a token's limit from its roles and spends from the bucket
of that limit; it is what the request path calls, with the verified claims.

`rate_limit.requests_per_second` refills, `rate_limit.burst` is the bucket size; 0 disables.
Each of a token's roles has its limit (its `rate_limit.roles` entry, else the default) and the
token gets the most generous one: unlimited (0) if any role is, else the highest rate, then the
largest burst. Buckets of tokens not seen for a minute are dropped, so memory follows active
tokens only.

A token's bucket is its lineage's (`Claims.lineage`: the root token it was attenuated from, at
any depth) at the root's rate (the limit of the root's roles): minting children, of any role, buys
no extra rate.
`DerivationLimit` bounds how fast new tokens are derived at all: attenuations per lineage and
exchanges per trust rule (`rate_limit.derivations_per_minute`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from gateway.core.tokens import Claims
from gateway.errors import RateLimited


class Bucket(Protocol):
    async def take(self, key: str, token_name: str) -> None:
        """Spend one request of `key`'s bucket; raises RateLimited when it is empty."""
        ...


BucketFactory = Callable[[float, int], Bucket]


class LocalBuckets:
    """Token buckets in this process's memory."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1) if rate > 0 else 0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # jti -> (tokens, updated)
        self._last_sweep = clock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def take(self, key: str, token_name: str) -> None:
        if not self.enabled:
            return
        now = self.clock()
        tokens, updated = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            retry = math.ceil((1.0 - tokens) / self.rate)
            raise RateLimited(over_rate_message(token_name, self.rate, self.burst, retry), retry_after_s=retry)
        self._buckets[key] = (tokens - 1.0, now)
        if now - self._last_sweep > 60:
            self._last_sweep = now
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}


def over_rate_message(token_name: str, rate: float, burst: int, retry_s: int) -> str:
    return f"token '{token_name}' is over its rate of {rate:g} requests/s (burst {burst}); retry after {retry_s}s"


class RateLimits:
    """The rate limit of each token, by its roles; one bucket per distinct limit."""

    def __init__(self, make: BucketFactory, default: tuple[float, int],
                 roles: Mapping[str, tuple[float, int]] | None = None) -> None:
        self.make = make
        self.default = default
        self.roles = dict(roles or {})
        self._buckets: dict[tuple[float, int], Bucket] = {}
        self._chosen: dict[frozenset[str], tuple[float, int]] = {}

    def limits_for(self, roles: Iterable[str]) -> tuple[float, int]:
        candidates = [self.roles.get(role, self.default) for role in roles] or [self.default]
        if any(rate <= 0 for rate, _ in candidates):
            return (0.0, 0)
        return max(candidates)

    async def check(self, claims: Claims) -> None:
        """Spend one request of the token's bucket; raises RateLimited when it is empty."""
        if self.roles:
            # A derived token spends its root's bucket at its root's rate (chain[-1]: the root's grants).
            roles = frozenset(grant.role for grant in (claims.chain[-1] if claims.chain else claims.grants))
            limits = self._chosen.get(roles)
            if limits is None:
                limits = self.limits_for(roles)
                if len(self._chosen) < 4096:  # role combinations are few; bounded all the same
                    self._chosen[roles] = limits
        else:
            limits = self.default  # one limit for every token: nothing to choose per request
        if limits[0] <= 0:
            return
        bucket = self._buckets.get(limits)
        if bucket is None:
            bucket = self._buckets[limits] = self.make(*limits)
        await bucket.take(claims.lineage, claims.name)


DERIVATION_BURST = 10  # derivations at once, before the per-minute refill applies


class DerivationLimit:
    """`per_minute` new tokens per key (a lineage for attenuation, a trust rule for the exchange),
    up to DERIVATION_BURST at once; 0 disables."""

    def __init__(self, make: BucketFactory, per_minute: int) -> None:
        self.per_minute = per_minute
        self.burst = max(1, min(per_minute, DERIVATION_BURST))
        self._bucket = make(per_minute / 60.0, self.burst) if per_minute > 0 else None

    async def take(self, key: str, who: str) -> None:
        """Spend one derivation of `key`; raises RateLimited naming `who` and the limit when spent."""
        if self._bucket is None:
            return
        try:
            await self._bucket.take("derive:" + key, who)
        except RateLimited as exc:
            retry = int(exc.headers.get("Retry-After", "60"))
            raise RateLimited(f"{who} has derived tokens faster than rate_limit.derivations_per_minute "
                              f"({self.per_minute}, up to {self.burst} at once); retry after {retry}s, "
                              "or reuse a token you already have", retry_after_s=retry) from None
