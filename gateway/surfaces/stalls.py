"""Cutting off request bodies that stall, without a timer per request.

`asyncio.timeout` around each `receive()` schedules and cancels a loop timer for every message,
a sixth of what a small GraphQL request costs the gateway. Instead each event loop gets one
watchdog task that wakes every `CHECK_INTERVAL_S` and cancels the tasks whose body has not moved
for their idle limit; a body read costs a dictionary write per message. A stall is cut off
between the limit and the limit plus `CHECK_INTERVAL_S` after the last progress. The watchdog
ends itself once nothing has been read for a while, and the next read starts it again.
"""

from __future__ import annotations

import asyncio
import weakref

CHECK_INTERVAL_S = 0.25
_IDLE_TICKS = 40  # the watchdog ends after this many checks with nothing being read (10 s)


class Stalls:
    """The body reads in progress on one event loop, and the watchdog that cuts off stalled ones."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # not a strong one: the loops' table is keyed by the loop
        self.reading: dict[asyncio.Task[object], float] = {}  # task -> loop time by which it must progress
        self.stalled: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()  # cancelled, not yet told
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop()

    def watch(self, task: asyncio.Task[object], deadline: float) -> None:
        self.reading[task] = deadline
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="scopegate-body-stalls")

    async def _watch(self) -> None:
        try:
            await self._cut_off_stalls()
        finally:
            self._watchdog = None  # a finished task still refers to its loop

    async def _cut_off_stalls(self) -> None:
        loop = asyncio.get_running_loop()
        idle = 0
        while idle < _IDLE_TICKS:
            await asyncio.sleep(CHECK_INTERVAL_S)
            if not self.reading:
                idle += 1
                continue
            idle = 0
            now = loop.time()
            for task, deadline in list(self.reading.items()):
                if deadline <= now and task not in self.stalled:
                    self.stalled.add(task)
                    task.cancel()

    def was_stalled(self, task: asyncio.Task[object]) -> bool:
        """True (once) when the watchdog cancelled `task` and nobody else did; the watchdog's
        cancellation is then taken back. Another cancellation (a shutdown) stays one."""
        if task not in self.stalled:
            return False
        self.stalled.discard(task)
        return task.uncancel() == 0


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Stalls] = weakref.WeakKeyDictionary()
_last: Stalls | None = None  # the last loop's, checked first: a server runs one loop per process


def stalls(loop: asyncio.AbstractEventLoop) -> Stalls:
    """The watch over body reads of `loop` (the running one)."""
    global _last
    last = _last
    if last is not None and last._loop() is loop:
        return last
    found = _LOOPS.get(loop)
    if found is None:
        found = _LOOPS[loop] = Stalls(loop)
    _last = found
    return found
