"""The `redis` audit sink: records appended to a stream in the store's Redis, shared by every instance."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis


class RedisSink:
    """The `redis` sink: records appended to a stream every instance shares (`XADD KEY MAXLEN ~ N *
    record LINE`, read with XRANGE/XREAD). `write` never waits for Redis: lines go to a bounded
    queue that a task on the running loop ships in pipelined batches. While Redis is down the
    queue keeps the newest `queue_limit` lines and retries each second; older ones are dropped
    and counted (reported on stderr once per outage)."""

    def __init__(self, client: Redis, key: str, maxlen: int, *, queue_limit: int = 10_000,
                 timeout_s: float = 1.0) -> None:
        self.client = client
        self.key = key
        self.maxlen = maxlen
        self.queue_limit = queue_limit
        self.timeout_s = timeout_s
        self.dropped = 0
        self._queue: deque[str] = deque()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def write(self, lines: list[str]) -> None:
        for line in lines:
            if len(self._queue) >= self.queue_limit:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(line)
        if self._task is None or self._task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: shipped by `drain`
                self._task = asyncio.get_running_loop().create_task(self._ship())

    async def _ship(self) -> None:
        from redis.exceptions import RedisError

        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 500))]
            try:
                async with asyncio.timeout(self.timeout_s):
                    pipe = self.client.pipeline(transaction=False)
                    for line in batch:
                        pipe.xadd(self.key, {"record": line.rstrip("\n")}, maxlen=self.maxlen, approximate=True)
                    await pipe.execute()
                self._failing = False
            except (RedisError, OSError, TimeoutError) as exc:
                room = max(self.queue_limit - len(self._queue), 0)
                self.dropped += max(len(batch) - room, 0)
                self._queue.extendleft(reversed(batch[len(batch) - room:]))  # the newest that fit
                if not self._failing:
                    self._failing = True
                    print(f"scopegate: audit sink redis failed ({exc.__class__.__name__}); records are kept "
                          f"in memory (up to {self.queue_limit}) and retried", file=sys.stderr)
                await asyncio.sleep(1.0)

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Ship what is queued (at most `timeout_s`), e.g. before the store's connection closes."""
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._ship())
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            self.close()

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

