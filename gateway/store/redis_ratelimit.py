"""The shared rate limiter: a token bucket per token, kept in Redis for every gateway instance.

With several instances behind one load balancer, a bucket per process would let a token through
once per instance; one bucket in Redis, refilled and taken by one atomic script, holds the limit
across all of them. The script lives here with the limiter; `RedisStore.take` runs it under the
store's timeout budget, so a slow or unreachable Redis fails closed like every other store call.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gateway.errors import RateLimited

if TYPE_CHECKING:
    from gateway.store.redis import RedisStore

BUCKET_SCRIPT = """
-- KEYS: bucket.  ARGV: rate per second, burst, ttl ms.  Returns {allowed 0|1, wait ms}.
-- Redis's own clock, so instances with skewed clocks share one bucket correctly.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if not tokens or not ts then
  tokens, ts = burst, now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
else
  now = ts
end
local allowed, wait = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {allowed, wait}
"""


class RedisRateLimiter:
    """The token bucket of `gateway.ratelimit.RateLimiter`, kept in Redis and shared by every
    instance: one atomic script per request refills and takes (`RedisStore.take`)."""

    def __init__(self, store: RedisStore, rate: float, burst: int) -> None:
        self.store = store
        self.rate = rate
        self.burst = max(burst, 1) if rate > 0 else 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def check(self, key: str, token_name: str) -> None:
        if not self.enabled:
            return
        wait_ms = await self.store.take(key, rate=self.rate, burst=self.burst)
        if wait_ms:
            retry = math.ceil(wait_ms / 1000)
            raise RateLimited(f"token '{token_name}' is over its rate of {self.rate:g} requests/s "
                              f"(burst {self.burst}); retry after {retry}s", retry_after_s=retry)
