"""Per-token rate limits: a token bucket per jti.

`RateLimiter` keeps the buckets in this process (the SQLite deployment: one instance). A shared
store provides its own limiter with the same `check` so that instances share one bucket.

`rate_limit.requests_per_second` refills, `rate_limit.burst` is the bucket size; 0 disables.
Buckets of tokens not seen for a minute are dropped, so memory follows active tokens only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from gateway.errors import RateLimited


class Limiter(Protocol):
    async def check(self, key: str, token_name: str) -> None:
        """Raises RateLimited when `key` is over its rate."""
        ...


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1) if rate > 0 else 0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # jti -> (tokens, updated)
        self._last_sweep = clock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def check(self, key: str, token_name: str) -> None:
        if not self.enabled:
            return
        now = self.clock()
        tokens, updated = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            retry = math.ceil((1.0 - tokens) / self.rate)
            raise RateLimited(f"token '{token_name}' is over its rate of {self.rate:g} requests/s "
                              f"(burst {self.burst}); retry after {retry}s", retry_after_s=retry)
        self._buckets[key] = (tokens - 1.0, now)
        if now - self._last_sweep > 60:
            self._last_sweep = now
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
