"""One upstream answer as it arrives on its connection (connections.py): status and headers, then
its body, read with a timeout on every wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from gateway.errors import UpstreamTimeout, UpstreamUnavailable


class Carrier(Protocol):
    """What an answer needs of the connection it arrives on (connections.UpstreamConnection)."""

    loop: asyncio.AbstractEventLoop

    @property
    def read_timeout_s(self) -> float: ...

    def close(self) -> None: ...

    def resume_reading(self) -> None: ...

    def finished(self, response: UpstreamResponse, *, reusable: bool) -> None: ...


class UpstreamResponse:
    """One upstream answer: status and headers once its head arrived, its body as it arrives.
    `release()` hands the connection back (answer read to the end) or closes it."""

    __slots__ = ("_body", "_buffered", "_complete", "_connection", "_error", "_head", "_waiter",
                 "content_length", "headers", "started", "status")

    def __init__(self, connection: Carrier, started: float) -> None:
        self._connection = connection
        self.started = started
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self._head = False  # status and headers have arrived
        self._body: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # What the connection reports, as the upstream's bytes are parsed.
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()

    async def _wait(self) -> None:
        """Until the connection reports something, at most `read_timeout_s`."""
        connection = self._connection
        waiter = self._waiter = connection.loop.create_future()
        timer = connection.loop.call_later(connection.read_timeout_s, self._timed_out)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self) -> None:
        self._fail(UpstreamTimeout("the upstream did not answer in time; retry later"))
        self._connection.close()

    async def _wait_head(self) -> None:
        while not self._head:
            if self._error is not None:
                raise self._error
            await self._wait()

    # What the surfaces use.
    async def next_chunk(self) -> bytes | None:
        """The body bytes that arrived since the last call (waiting for some), None at its end."""
        while True:
            if self._body:
                parts, self._body, self._buffered = self._body, [], 0
                self._connection.resume_reading()
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait()

    @property
    def ended(self) -> bool:
        """The whole body arrived and was taken: the next `next_chunk()` says None."""
        return self._complete and not self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def read_all(self, limit: int) -> bytes:
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise UpstreamUnavailable(f"the upstream answer is larger than {limit} bytes and cannot be filtered")
        return bytes(data)

    def release(self) -> None:
        self._connection.finished(self, reusable=self._complete and not self._body)
