"""The gateway's own upstream client (gateway/upstream/connections.py) against real loopback
servers that answer with exact bytes: kept-alive reuse, the retry of a reused connection the
upstream closed (never for a POST), answer framing (length, chunked, until close, HEAD, 1xx),
timeouts, malformed answers, streamed bodies with backpressure, and the target sent byte for byte."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.errors import BadRequest, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream import connections
from gateway.upstream.client import UpstreamClient
from gateway.upstream.headers import OutgoingHeaders
from tests.test_redis_store import make_certificates

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Upstream"], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"


@dataclass
class Upstream:
    """A loopback server whose `handler` writes each answer's exact bytes; it records what came."""

    handler: Handler
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)  # each request's head
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    tls: ssl.SSLContext | None = None

    async def start(self) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                await self.handler(reader, writer, self)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.tls)
        return int(self.server.sockets[0].getsockname()[1])

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the transports' close callbacks run


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream,
                      answer: bytes = OK) -> None:
    while True:
        head = await upstream.read_head(reader)
        length = _length(head)
        if length:
            await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def client_for(port: int, *, read_timeout_s: float = 5.0, base: str = "http://127.0.0.1") -> UpstreamClient:
    client = UpstreamClient(f"{base}:{port}", auth_scheme="Bearer", credential="upstream-secret",
                            connect_timeout_s=2, read_timeout_s=read_timeout_s)
    await client.start()
    return client


def headers() -> OutgoingHeaders:
    return OutgoingHeaders([(b"accept", b"application/json")])


async def fetch(client: UpstreamClient, method: str = "GET", target: bytes = b"/v1/apps",
                body: bytes | AsyncIterator[bytes] | None = None,
                given: OutgoingHeaders | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    response = await client.send(method, target, given or headers(), body)
    try:
        return response.status, response.headers, await response.read_all(64 * 1024 * 1024)
    finally:
        response.release()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_a_connection_is_kept_alive_and_reused() -> None:
    async def test() -> None:
        upstream = Upstream(answer_each)
        client = await client_for(await upstream.start())
        for _ in range(5):
            assert await fetch(client) == (200, [(b"content-length", b"2"), (b"content-type", b"application/json")],
                                           b"{}")
        assert upstream.connections == 1
        assert len(upstream.requests) == 5
        await client.close()
        await upstream.stop()

    run(test)


def test_the_target_and_headers_go_byte_for_byte_with_the_credential_and_framing() -> None:
    async def test() -> None:
        upstream = Upstream(answer_each)
        client = await client_for(await upstream.start())
        built = client.build_headers([(b"accept", b"application/json"), (b"authorization", b"Bearer sgt_client"),
                                      (b"host", b"gw.example")], allowed=frozenset({b"accept", b"authorization"}),
                                     client_ip="10.0.0.9", scheme="https", request_id="r1")
        await fetch(client, "POST", b"/v1/apps/a%2Fb/machines?x=%41&&y", b'{"a":1}', built)
        await fetch(client, "GET", b"/v1/apps?")
        await fetch(client, "POST", b"/v1/apps/x/machines/y/stop")
        post, bare, empty_post = upstream.requests
        assert post.startswith(b"POST /v1/apps/a%2Fb/machines?x=%41&&y HTTP/1.1\r\n")
        assert b"\r\nauthorization: Bearer upstream-secret\r\n" in post and b"sgt_client" not in post
        assert b"\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: https\r\nx-forwarded-host: gw.example\r\n" in post
        assert b"\r\ncontent-length: 7\r\n" in post and b"\r\naccept: application/json\r\n" in post
        assert bare.startswith(b"GET /v1/apps? HTTP/1.1\r\n")
        assert b"content-length" not in bare
        assert b"\r\ncontent-length: 0\r\n" in empty_post
        await client.close()
        await upstream.stop()

    run(test)


def test_a_reused_connection_the_upstream_closed_is_retried_once_for_a_get_never_for_a_post() -> None:
    async def one_answer_then_close_without_notice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                                   upstream: Upstream) -> None:
        head = await upstream.read_head(reader)
        await reader.readexactly(_length(head))
        writer.write(OK)
        await writer.drain()
        # The next request on this connection is read, then the connection drops unanswered: the
        # race of an upstream closing an idle kept-alive connection as the gateway reuses it.
        await upstream.read_head(reader)
        writer.transport.abort()

    async def test() -> None:
        upstream = Upstream(one_answer_then_close_without_notice)
        client = await client_for(await upstream.start())
        assert (await fetch(client))[0] == 200
        assert (await fetch(client))[0] == 200  # retried on a fresh connection
        assert upstream.connections == 2
        assert [r.split(b" ")[0] for r in upstream.requests] == [b"GET", b"GET", b"GET"]
        with pytest.raises(UpstreamUnavailable, match="dropped the connection"):
            await fetch(client, "POST", b"/v1/apps/x/machines", b"{}")
        assert [r.split(b" ")[0] for r in upstream.requests].count(b"POST") == 1  # never sent twice
        await client.close()
        await upstream.stop()

    run(test)


def test_the_retry_after_a_dropped_reused_connection_is_one_and_on_a_fresh_connection() -> None:
    """With several idle connections the upstream has dropped unseen (it restarted, say), the retry
    took the next idle one, and the next: one GET (or PUT, DELETE) went to the upstream once per
    idle connection instead of at most twice."""
    async def answer_then_drop_the_next(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                        upstream: Upstream) -> None:
        await upstream.read_head(reader)
        await asyncio.sleep(0.05)  # the burst below opens three connections
        writer.write(OK)
        await writer.drain()
        await upstream.read_head(reader)
        writer.transport.abort()

    async def test() -> None:
        upstream = Upstream(lambda r, w, u: answer_then_drop_the_next(r, w, u) if u.connections <= 3
                            else answer_each(r, w, u))
        client = await client_for(await upstream.start())
        await asyncio.gather(*(fetch(client) for _ in range(3)))
        assert upstream.connections == 3
        del upstream.requests[:]
        assert (await fetch(client, "DELETE", b"/v1/apps/x/machines/1"))[0] == 200
        assert [r.split(b" ")[0] for r in upstream.requests] == [b"DELETE", b"DELETE"]
        assert upstream.connections == 4
        await client.close()
        await upstream.stop()

    run(test)


@pytest.mark.parametrize(("answer", "body"), [
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n", b"abcdefg"),
    (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", b"abc"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
])
def test_framed_answers_are_read_whole_and_the_connection_reused(answer: bytes, body: bytes) -> None:
    async def test() -> None:
        upstream = Upstream(lambda r, w, u: answer_each(r, w, u, answer))
        client = await client_for(await upstream.start())
        for _ in range(2):
            status, got_headers, got = await fetch(client)
            assert got == body
            assert status in (200, 204)
            assert not any(name in (b"transfer-encoding", b"link") and status == 103 for name, _ in got_headers)
            assert b"transfer-encoding" not in dict(got_headers)  # hop-by-hop: the gateway frames its own
        assert upstream.connections == 1
        await client.close()
        await upstream.stop()

    run(test)


def test_an_answer_delimited_by_close_is_read_to_the_end_and_its_connection_not_reused() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await upstream.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()
        writer.close()

    async def test() -> None:
        upstream = Upstream(until_close)
        client = await client_for(await upstream.start())
        assert (await fetch(client))[2] == b"part one, part two"
        assert (await fetch(client))[2] == b"part one, part two"
        assert upstream.connections == 2
        await client.close()
        await upstream.stop()

    run(test)


def test_a_head_answer_ends_at_its_head_and_one_announcing_a_body_leaves_its_connection() -> None:
    """A HEAD answer has no body whatever its Content-Length says. One that announces a body is not
    trusted with the next request: an upstream that sent that body anyway, late, would have its
    bytes read as the next request's answer (another client's)."""
    leftover = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot yours"

    async def late_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await upstream.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
        await writer.drain()
        await upstream.read_head(reader)  # only if the connection was reused
        writer.write(leftover)
        await asyncio.sleep(0.2)
        writer.write(OK)
        await writer.drain()

    async def test() -> None:
        upstream = Upstream(lambda r, w, u: late_body(r, w, u) if u.connections == 1 else answer_each(r, w, u))
        client = await client_for(await upstream.start())
        status, got_headers, body = await fetch(client, "HEAD")
        assert (status, body, dict(got_headers)[b"content-length"]) == (200, b"", b"1234")
        assert await fetch(client) == (200, [(b"content-length", b"2"), (b"content-type", b"application/json")], b"{}")
        assert upstream.connections == 2
        await client.close()
        await upstream.stop()

    async def empty() -> None:
        upstream = Upstream(lambda r, w, u: answer_each(r, w, u, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"))
        client = await client_for(await upstream.start())
        for _ in range(2):
            assert (await fetch(client, "HEAD"))[::2] == (200, b"")
        assert upstream.connections == 1
        await client.close()
        await upstream.stop()

    run(test)
    run(empty)


def test_an_upstream_that_does_not_answer_times_out_and_a_malformed_answer_is_refused() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await upstream.read_head(reader)
        await asyncio.sleep(5)

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await upstream.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\rbroken\r\n\r\n{}")
        await writer.drain()
        await asyncio.sleep(1)

    async def test() -> None:
        upstream = Upstream(silent)
        client = await client_for(await upstream.start(), read_timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await fetch(client)
        assert 0.25 < time.monotonic() - started < 3
        await client.close()
        await upstream.stop()
        upstream = Upstream(malformed)
        client = await client_for(await upstream.start())
        with pytest.raises(UpstreamUnavailable, match="malformed"):
            await fetch(client)
        await client.close()
        await upstream.stop()

    run(test)


def test_an_endless_answer_head_is_cut_off() -> None:
    async def endless_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await upstream.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: ")
        for _ in range(64):
            writer.write(b"a" * 16384)
            await writer.drain()
        await asyncio.sleep(1)

    async def test() -> None:
        upstream = Upstream(endless_header)
        client = await client_for(await upstream.start())
        with pytest.raises(UpstreamUnavailable, match="head is larger than"):
            await fetch(client)
        await client.close()
        await upstream.stop()

    run(test)


def test_endless_trailers_are_cut_off_like_an_endless_head_and_never_kept() -> None:
    """A chunked answer's trailers are headers too: without a bound, an upstream that keeps sending
    them grows the gateway's memory for the whole read timeout (hundreds of MB a second on loopback)."""
    async def endless_trailers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await upstream.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")
        for _ in range(64):
            writer.write(b"x-trailer: " + b"a" * 16384 + b"\r\n")
            await writer.drain()
        await asyncio.sleep(10)

    async def test() -> None:
        upstream = Upstream(endless_trailers)
        client = await client_for(await upstream.start(), read_timeout_s=5)
        response = await client.send("GET", b"/v1/apps", headers(), None)
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="larger than"):
            await response.read_all(1024)
        assert time.monotonic() - started < 4
        assert response.headers == []  # trailers never join the headers (transfer-encoding is hop-by-hop)
        response.release()
        await client.close()
        await upstream.stop()

    run(test)


def test_idle_connections_are_closed_once_past_their_idle_limit_even_when_no_request_comes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a burst, the pool held every connection it opened (up to MAX_IDLE) open for as long as
    the upstream kept it: only a request popping one noticed it was stale, and the most recently
    used ones are popped first."""
    monkeypatch.setattr(connections, "IDLE_S", 0.2)
    closed: list[int] = []

    async def answer_then_note_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                     upstream: Upstream) -> None:
        try:
            await answer_each(reader, writer, upstream)
        finally:
            closed.append(1)

    async def test() -> None:
        upstream = Upstream(answer_then_note_close)
        client = await client_for(await upstream.start())
        await asyncio.gather(*(fetch(client) for _ in range(3)))
        assert upstream.connections == 3
        await asyncio.sleep(0.8)
        assert len(closed) == 3
        await client.close()
        await upstream.stop()

    run(test)


def test_a_head_split_across_reads_is_not_refused_for_the_body_that_follows_it() -> None:
    """The head's size was counted with every byte read until the head was complete, body included:
    a head that arrived in two reads, the second one carrying the start of a large body (a layer,
    a long listing), was refused as 'larger than 256 KiB'."""
    body = b"x" * 300_000

    async def split_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await upstream.read_head(reader)  # a large answer first: the socket's receive buffer grows
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body) * 20, body * 20))
        await writer.drain()
        await upstream.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"ngth: 300000\r\n\r\n" + body)
        await writer.drain()
        await asyncio.sleep(1)

    async def test() -> None:
        upstream = Upstream(split_head)
        client = await client_for(await upstream.start())
        await fetch(client)
        status, _, got = await fetch(client)
        assert (status, len(got)) == (200, len(body))
        await client.close()
        await upstream.stop()

    run(test)


def test_a_refused_connection_is_upstream_unavailable() -> None:
    async def test() -> None:
        upstream = Upstream(answer_each)
        port = await upstream.start()
        await upstream.stop()
        client = await client_for(port)
        with pytest.raises(UpstreamUnavailable, match="refused or dropped"):
            await fetch(client)
        await client.close()

    run(test)


def test_a_streamed_body_goes_chunked_or_as_the_client_framed_it() -> None:
    received: list[bytes] = []

    async def echo_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        while True:
            head = await upstream.read_head(reader)
            if b"transfer-encoding: chunked" in head:
                data = b""
                while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) != 0:
                    data += (await reader.readexactly(size + 2))[:-2]
                await reader.readexactly(2)
            else:
                data = await reader.readexactly(_length(head))
            received.append(data)
            writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"layer-", b"", b"bytes-" * 50_000, b"end"):
            yield part

    async def test() -> None:
        upstream = Upstream(echo_body)
        client = await client_for(await upstream.start())
        assert (await fetch(client, "PATCH", b"/v2/a/blobs/uploads/1", parts()))[0] == 201
        framed = headers()
        framed["Content-Length"] = str(len(b"layer-" + b"bytes-" * 50_000 + b"end"))
        assert (await fetch(client, "PATCH", b"/v2/a/blobs/uploads/1", parts(), framed))[0] == 201
        assert received == [b"layer-" + b"bytes-" * 50_000 + b"end"] * 2
        assert upstream.connections == 1
        await client.close()
        await upstream.stop()

    run(test)


def test_a_large_answer_streams_through_with_backpressure() -> None:
    size = 8 * 1024 * 1024

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        await upstream.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async def test() -> None:
        upstream = Upstream(big)
        client = await client_for(await upstream.start())
        response = await client.send("GET", b"/v2/a/blobs/sha256:1", headers(), None)
        seen, largest = 0, 0
        while (chunk := await response.next_chunk()) is not None:
            seen += len(chunk)
            largest = max(largest, len(chunk))
            await asyncio.sleep(0.001)  # a slow client: the upstream connection is paused meanwhile
        response.release()
        assert seen == size
        assert largest <= 1024 * 1024  # never the whole answer in memory at once
        await client.close()
        await upstream.stop()

    run(test)


def test_a_header_value_with_a_line_break_is_never_written() -> None:
    given = OutgoingHeaders()
    with pytest.raises(BadRequest, match="line break"):
        given["X-Request-Id"] = "abc\r\nx-injected: 1"
    with pytest.raises(BadRequest, match="line break"):
        given.add(b"user-agent", b"ua\nx: y")
    assert len(given) == 0


def test_headers_are_set_replaced_read_and_dropped_by_any_case_of_their_name() -> None:
    given = OutgoingHeaders([(b"accept-encoding", b"gzip"), (b"accept", b"*/*"), (b"accept-encoding", b"br")])
    assert given.popall("Accept-Encoding") == ["gzip", "br"]
    assert given.popall("Accept-Encoding", None) is None
    given["Content-Type"] = "application/json"
    given["content-type"] = "application/octet-stream"
    assert given.items == [(b"accept", b"*/*"), (b"content-type", b"application/octet-stream")]
    assert given.get("CONTENT-TYPE") == "application/octet-stream" and "Accept" in given


def test_an_https_upstream_must_prove_its_name_before_the_credential_is_sent(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls")
    other_ca, _, _ = make_certificates(tmp_path / "other")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)

    async def test() -> None:
        upstream = Upstream(answer_each, tls=server_tls)
        port = await upstream.start()
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # what ssl.create_default_context() trusts
        client = await client_for(port, base="https://localhost")
        assert (await fetch(client))[0] == 200
        assert (await fetch(client))[0] == 200
        assert upstream.connections == 1 and len(upstream.requests) == 2
        assert upstream.requests[0].startswith(b"GET /v1/apps HTTP/1.1\r\nhost: localhost:%d\r\n" % port)
        await client.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))  # a certificate nobody trusts here
        client = await client_for(port, base="https://localhost")
        with pytest.raises(UpstreamUnavailable, match="refused or dropped"):
            await fetch(client)
        assert len(upstream.requests) == 2  # nothing (no credential) went to the unproven server
        await client.close()
        await upstream.stop()

    run(test)
