"""The lean forwarding path (issue 19) against an upstream that misbehaves on its kept-alive
connections: the gateway (real uvicorn stack) in front of a loopback upstream that writes exact
bytes, in an exact order, on each connection it accepts.

What must hold: an upstream answer, or bytes left over from one, never reaches another request
than the one it answered; an answer the gateway cannot relay faithfully is a 502, never a
dropped connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway import server_cycle
from gateway.app import GatewayApp
from gateway.config import load_config
from gateway.core.keyring import Keyring
from gateway.services import Services
from tests.conftest import CREDENTIAL_ENV, RunningGateway, write_config
from tests.security.harness import CREDENTIAL, converse, request, send
from tests.servers import RecordingUpstream, ServerThread

MACHINES = b"/v1/apps/web-staging/machines"
# What a connection's handler gets: read the next request's head (None once the gateway closed
# the connection), and write bytes.
Script = Callable[[Callable[[], bytes | None], Callable[[bytes], None]], None]


class ScriptedUpstream:
    """Each accepted connection runs the next script (the last one repeats); heads are recorded."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.connections = 0
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            script = self.scripts[min(self.connections, len(self.scripts) - 1)]
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, script), daemon=True).start()

    def _serve(self, conn: socket.socket, script: Script) -> None:
        buffer = b""

        def read_head() -> bytes | None:
            nonlocal buffer
            while b"\r\n\r\n" not in buffer:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return None
                if not data:
                    return None
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            self.heads.append(head)
            return head

        with conn, contextlib.suppress(OSError):
            script(read_head, conn.sendall)

    def stop(self) -> None:
        self.listener.close()


def answering(answer: bytes) -> Script:
    def script(read_head: Callable[[], bytes | None], write: Callable[[bytes], None]) -> None:
        while read_head() is not None:
            write(answer)
    return script


Start = Callable[..., tuple[RunningGateway, str, ScriptedUpstream]]


@pytest.fixture
def scripted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Start]:
    started: list[tuple[ServerThread, ScriptedUpstream]] = []

    def start(*scripts: Script) -> tuple[RunningGateway, str, ScriptedUpstream]:
        upstream = ScriptedUpstream(*scripts)
        monkeypatch.setenv(CREDENTIAL_ENV, CREDENTIAL)
        config = load_config(write_config(tmp_path, f"http://127.0.0.1:{upstream.port}"))
        Keyring.generate(config.tokens_keyring).save()
        services = Services.build(config)
        server = ServerThread(GatewayApp(services), gateway_stack=True).start()
        started.append((server, upstream))
        gateway = RunningGateway(config, services, server, RecordingUpstream(), tmp_path / "audit.jsonl")
        return gateway, gateway.mint("deployer@app:web-staging", name="hot-path"), upstream

    yield start
    for server, upstream in started:
        server.stop()
        upstream.stop()


OK_FOR_B = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\ncontent-type: application/json\r\n\r\n{\"for\":\"B\"}"
LEFTOVER = b"HTTP/1.1 200 OK\r\ncontent-length: 16\r\ncontent-type: application/json\r\n\r\n{\"for\":\"nobody\"}"


@pytest.mark.parametrize("first", [
    b"HTTP/1.1 204 No Content\r\ncontent-length: 16\r\n\r\n",  # a 204 that announces a body anyway
    b"HTTP/1.1 304 Not Modified\r\ncontent-length: 16\r\n\r\n",  # a 304 with its representation's length
])
def test_a_late_body_after_an_answer_that_has_none_never_answers_the_next_request(
        scripted: Start, first: bytes) -> None:
    """The upstream sends the body it announced for a 204 (or a 304) only once the next request
    came on the same connection: those bytes must not be taken for that request's answer (HEAD:
    tests/test_upstream_connections.py)."""
    def late_body(read_head: Callable[[], bytes | None], write: Callable[[bytes], None]) -> None:
        if read_head() is None:
            return
        write(first)
        if read_head() is None:  # the connection was not reused: nothing to take the leftover
            return
        write(LEFTOVER)
        time.sleep(0.3)
        write(OK_FOR_B)

    gateway, token, upstream = scripted(late_body, answering(OK_FOR_B))
    answer = send(gateway, request("GET", MACHINES, token=token))
    assert answer.status in (204, 304, 502)
    answer = send(gateway, request("GET", MACHINES, token=token))
    assert (answer.status, answer.body) == (200, b'{"for":"B"}')
    assert upstream.connections == 2


def test_bytes_after_an_answer_never_rewrite_it_nor_stay_for_the_next_request(
        scripted: Start) -> None:
    """A second answer nobody asked for, in the same write as the first: the first is relayed as it
    came, and the connection is not kept."""
    extra = b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\nx-not-yours: 1\r\n\r\n"
    gateway, token, upstream = scripted(answering(OK_FOR_B + extra))
    answer = send(gateway, request("GET", MACHINES, token=token))
    assert (answer.status, answer.body) == (200, b'{"for":"B"}')
    assert "x-not-yours" not in answer.headers
    send(gateway, request("GET", MACHINES, token=token))
    assert upstream.connections == 2


@pytest.mark.parametrize("status", [b"600", b"999", b"099"])
def test_an_answer_status_outside_100_to_599_is_a_502_not_a_dropped_connection(
        scripted: Start, status: bytes) -> None:
    gateway, token, _ = scripted(answering(b"HTTP/1.1 " + status + b" Odd\r\ncontent-length: 2\r\n\r\n{}"))
    answer = send(gateway, request("GET", MACHINES, token=token))
    assert answer.status == 502, answer
    assert CREDENTIAL.encode() not in answer.body


@pytest.mark.parametrize("answer", [
    # a transfer coding other than chunked: relayed without it, the client would take gzip for the body
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n\x1f\x8b",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n\x1f\x8b",
    # an informational answer with a body (llhttp reads one for 104-199): it joined the final answer's
    b"HTTP/1.1 150 Odd\r\ncontent-length: 6\r\n\r\nextra!HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
])
def test_an_answer_the_gateway_cannot_relay_as_it_came_is_a_502(scripted: Start, answer: bytes) -> None:
    def once(read_head: Callable[[], bytes | None], write: Callable[[bytes], None]) -> None:
        if read_head() is not None:
            write(answer)

    gateway, token, _ = scripted(once)
    answer_ = send(gateway, request("GET", MACHINES, token=token))
    assert (answer_.status, answer_.error) == (502, "upstream_unavailable"), answer_


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_a_bodyless_answer_that_states_its_representation_length_is_relayed_whole(scripted: Start,
                                                                                  status: bytes) -> None:
    """RFC 9110 section 8.6 lets a 304 (and a HEAD answer) carry the length of the body it does not
    send: the relay must end the answer, not fail as 'shorter than Content-Length' and drop the
    client's kept-alive connection."""
    gateway, token, _ = scripted(answering(b"HTTP/1.1 " + status + b"\r\ncontent-length: 16\r\netag: \"v1\"\r\n\r\n"))
    raw = converse(gateway.port, request("GET", MACHINES, token=token, close=False)
                   + request("GET", MACHINES, token=token), timeout=3)
    assert raw.count(b"HTTP/1.1 " + status) == 2, raw


def test_a_client_that_leaves_mid_answer_stops_the_download_from_the_upstream(scripted: Start) -> None:
    """The relay kept reading the upstream's answer to its end after the client had left (sends to a
    gone client return silently): asking for a large layer and hanging up at once made the gateway
    download all of it, for nobody, as many times as a client asked."""
    stopped: list[float] = []
    gateway, token, _ = scripted(endless_answer(stopped, seconds=8, pause=0.005))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as client:
        client.sendall(request("GET", MACHINES, token=token))
        assert client.recv(65536).startswith(b"HTTP/1.1 200 ")
    left = time.monotonic()
    assert wait_until(lambda: bool(stopped), 4), "the gateway kept reading the answer after its client left"
    assert stopped[0] - left < 4


def endless_answer(stopped: list[float], *, seconds: float, pause: float,
                   limit: int = 4096) -> Callable[[Callable[[], bytes | None], Callable[[bytes], None]], None]:
    """An upstream script: a chunked answer of 64 KiB parts (at most `limit` of them, for at most
    `seconds`) that notes in `stopped` when the gateway stopped taking it."""
    chunk = b"x" * 65536

    def endless(read_head: Callable[[], bytes | None], write: Callable[[bytes], None]) -> None:
        if read_head() is None:
            return
        write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n")
        deadline = time.monotonic() + seconds
        try:
            for _ in range(limit):
                if time.monotonic() >= deadline:
                    return
                write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if pause:
                    time.sleep(pause)
        except OSError:
            stopped.append(time.monotonic())
            raise

    return endless


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_client_that_stops_reading_is_cut_off_and_releases_the_upstream(
        scripted: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backpressure held the relay as long as the client took nothing: a client that asked for a
    large answer and never read it pinned a task, buffers and a connection holding the upstream
    credential, for ever (uvicorn has no send timeout)."""
    monkeypatch.setattr(server_cycle, "SEND_STALL_S", 0.5)
    stopped: list[float] = []
    gateway, token, _ = scripted(endless_answer(stopped, seconds=60, pause=0))  # 256 MiB at most
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(request("GET", MACHINES, token=token))
        assert client.recv(1024).startswith(b"HTTP/1.1 200 ")
        assert wait_until(lambda: bool(stopped), 8), "the relay still waits for a client that reads nothing"
