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
        self.loop = loop
        self.reading: dict[asyncio.Task[object], float] = {}  # task -> loop time by which it must progress
        self.stalled: set[asyncio.Task[object]] = set()  # cancelled by the watchdog, not yet told
        self._watchdog: asyncio.Task[None] | None = None

    def watch(self, task: asyncio.Task[object], deadline: float) -> None:
        self.reading[task] = deadline
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = self.loop.create_task(self._watch(), name="scopegate-body-stalls")

    async def _watch(self) -> None:
        idle = 0
        while idle < _IDLE_TICKS:
            await asyncio.sleep(CHECK_INTERVAL_S)
            if not self.reading:
                idle += 1
                continue
            idle = 0
            now = self.loop.time()
            for task, deadline in list(self.reading.items()):
                if deadline <= now and task not in self.stalled:
                    self.stalled.add(task)
                    task.cancel()

    def was_stalled(self, task: asyncio.Task[object]) -> bool:
        """True (once) when the watchdog cancelled `task`; the cancellation is then taken back."""
        if task not in self.stalled:
            return False
        self.stalled.discard(task)
        task.uncancel()
        return True


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Stalls] = weakref.WeakKeyDictionary()
_last: Stalls | None = None  # the last loop's, checked first: a server runs one loop per process


def stalls() -> Stalls:
    """The running loop's watch over body reads."""
    global _last
    loop = asyncio.get_running_loop()
    last = _last
    if last is not None and last.loop is loop:
        return last
    found = _LOOPS.get(loop)
    if found is None:
        found = _LOOPS[loop] = Stalls(loop)
    _last = found
    return found
