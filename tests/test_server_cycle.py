"""`OneWriteCycle` (gateway/server_cycle.py): a proxied answer's head leaves with its first body
bytes, framed as uvicorn frames it; the transport records every write it is given."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl

from gateway.server_cycle import OneWriteCycle


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def cycle(method: str = "GET", *, keep_alive: bool = True) -> tuple[OneWriteCycle, RecordingTransport, list[str]]:
    transport = RecordingTransport()
    completed: list[str] = []
    scope: Any = {"type": "http", "method": method, "http_version": "1.1", "path": "/v1/apps", "headers": []}
    made = OneWriteCycle(scope=scope, transport=transport, flow=FlowControl(transport),  # type: ignore[arg-type]
                         logger=logging.getLogger("test"), access_logger=logging.getLogger("test.access"),
                         access_log=False, default_headers=[], message_event=asyncio.Event(),
                         expect_100_continue=False, keep_alive=keep_alive, on_response=lambda: completed.append("done"))
    return made, transport, completed


def start(status: int, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def test_an_answer_of_known_length_leaves_in_one_write() -> None:
    async def test() -> None:
        made, transport, completed = cycle()
        await made.send(start(200, [(b"content-length", b"2"), (b"x-request-id", b"r1")]))
        assert transport.writes == []  # the head waits for the body
        await made.send(body(b"{}", False))
        assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-request-id: r1\r\n\r\n{}"]
        assert completed == ["done"] and made.response_complete and not transport.closed

    asyncio.run(test())


def test_an_answer_of_unknown_length_is_chunked_and_ends_with_its_last_part() -> None:
    async def test() -> None:
        made, transport, _ = cycle()
        await made.send(start(200, [(b"content-type", b"application/json")]))
        await made.send(body(b"abc", True))
        await made.send(body(b"de", False))
        assert transport.writes == [
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
            b"2\r\nde\r\n0\r\n\r\n",
        ]

    asyncio.run(test())


def test_a_head_answer_keeps_its_length_and_sends_no_body_and_a_closing_answer_says_so() -> None:
    async def test() -> None:
        made, transport, _ = cycle("HEAD")
        await made.send(start(200, [(b"content-length", b"1234")]))
        await made.send(body(b"", False))
        assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"]
        made, transport, _ = cycle(keep_alive=False)
        await made.send(start(204, []))
        await made.send(body(b"", False))
        assert transport.writes == [b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"] and transport.closed

    asyncio.run(test())


@pytest.mark.parametrize("header", [(b"x-a", b"v\r\nx-injected: 1"), (b"x-a", b"v\nx"), (b"x a", b"v"),
                                    (b"x-a\r\nx-b", b"v"), (b"x-a", b"v\x00")])
def test_a_header_that_would_break_the_head_is_refused_and_nothing_is_written(header: tuple[bytes, bytes]) -> None:
    async def test() -> None:
        made, transport, _ = cycle()
        with pytest.raises(RuntimeError, match="Invalid HTTP header"):
            await made.send(start(200, [(b"content-length", b"0"), header]))
        assert transport.writes == []

    asyncio.run(test())


def test_a_body_longer_or_shorter_than_its_length_is_an_error() -> None:
    async def test() -> None:
        made, _, _ = cycle()
        await made.send(start(200, [(b"content-length", b"2")]))
        with pytest.raises(RuntimeError, match="longer"):
            await made.send(body(b"abc", False))
        made, _, _ = cycle()
        await made.send(start(200, [(b"content-length", b"2")]))
        with pytest.raises(RuntimeError, match="shorter"):
            await made.send(body(b"a", False))

    asyncio.run(test())
