"""The shared rate limiter: a token bucket per token, kept in Redis for every gateway instance.

With several instances behind one load balancer, a bucket per process would let a token through
once per instance; one bucket in Redis, refilled and taken by one atomic script, holds the limit
across all of them. The script lives here with the buckets; `RedisStore.take` runs it under the
store's timeout budget, so a slow or unreachable Redis fails closed like every other store call.
`RedisStore.rate_buckets` makes these for the request path's `RateLimits` (core/ratelimit.py).
"""

from __future__ import annotations

import math
from typing import Protocol

from gateway.core.ratelimit import over_rate_message
from gateway.errors import RateLimited

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


class BucketScriptRunner(Protocol):
    async def take(self, key: str, *, rate: float, burst: int) -> int:
        """Run BUCKET_SCRIPT for `key`: 0 when a request was taken, else the wait in ms."""
        ...


class RedisBuckets:
    """The token buckets of `gateway.core.ratelimit.LocalBuckets`, kept in Redis and shared by every
    instance: one atomic script per request refills and takes (`RedisStore.take`)."""

    def __init__(self, store: BucketScriptRunner, rate: float, burst: int) -> None:
        self.store = store
        self.rate = rate
        self.burst = max(burst, 1) if rate > 0 else 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def take(self, key: str, token_name: str) -> None:
        if not self.enabled:
            return
        wait_ms = await self.store.take(key, rate=self.rate, burst=self.burst)
        if wait_ms:
            retry = math.ceil(wait_ms / 1000)
            raise RateLimited(over_rate_message(token_name, self.rate, self.burst, retry), retry_after_s=retry)
