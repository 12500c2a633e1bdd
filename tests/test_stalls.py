"""Stalled request bodies are cut off by one watchdog per event loop (gateway/surfaces/stalls.py).

The adversarial suite (tests/security/test_exhaustion.py, test_audit_truth.py) drives it through a
real server; these pin what a review found around it: another cancellation (a shutdown) landing
with the watchdog's stays a cancellation, and finished event loops are not kept alive.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from gateway.errors import RequestTimeout
from gateway.surfaces import http, stalls


async def _never() -> dict[str, object]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_a_stalled_body_is_cut_off_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "BODY_IDLE_TIMEOUT_S", 0.3)

    async def run() -> float:
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match="stalled"):
            await http.read_body(_never, 100)
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    assert 0.3 <= elapsed < 0.3 + stalls.CHECK_INTERVAL_S + 0.5


def test_another_cancellation_landing_with_the_watchdogs_stays_a_cancellation() -> None:
    async def run() -> asyncio.Task[bytes]:
        task = asyncio.get_running_loop().create_task(http.read_body(_never, 100))
        await asyncio.sleep(0.01)  # suspended in receive()
        watch = stalls.stalls(asyncio.get_running_loop())
        watch.stalled.add(task)  # the watchdog's cancellation...
        task.cancel()
        task.cancel()  # ...and a shutdown's, before the task runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        return task

    task = asyncio.run(run())
    assert task.cancelled()


def test_finished_event_loops_are_not_kept() -> None:
    async def one_read() -> bytes:
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict[str, object]:
            return messages.pop()

        return await http.read_body(receive, 100)

    for _ in range(3):
        assert asyncio.run(one_read()) == b"{}"
    gc.collect()
    assert not [loop for loop in list(stalls._LOOPS.keys()) if loop.is_closed()]
