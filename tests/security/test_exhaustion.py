"""Exhaustion: body and header limits, slow clients, and the connection cap.

A gateway holding an org-wide credential is also a single point of failure: a client that can
pin its memory or its connections takes every deploy in the organization down with it. The
body limit is `limits.max_body_bytes` (413); the header section is bounded by the server (431 or
400; the gateway's server config asks for 64 KiB); a client that stops sending must be cut off in
bounded time (STALL_BOUND_S) whether it stalls in the request line, the headers or the body; and
beyond `limit_concurrency` connections the server answers 503 without forwarding anything.
Everything here is loopback only and bounded in time and count.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.app import GatewayApp
from gateway.config import load_config
from gateway.core.keyring import Keyring
from gateway.server import uvicorn_config
from gateway.services import Services
from tests.conftest import CREDENTIAL_ENV, RunningGateway, write_config
from tests.security.harness import (
    CREDENTIAL,
    assert_forwarded_exactly,
    assert_refused,
    converse,
    request,
    reset,
    running_gateway,
    send,
    statuses,
    wait_for,
)
from tests.servers import RecordingUpstream, ServerThread

LIMIT = 4096
METADATA = b"/v1/apps/web-staging/machines/m1/metadata/role"  # streamed straight through
MACHINES = b"/v1/apps/web-staging/machines"  # read whole: a body constraint applies to deployers
# A client that stops sending is cut off within this many seconds (a header or body read timeout).
STALL_BOUND_S = 10.0
HEADER_SECTION_LIMIT = 64 * 1024  # gateway/server.py asks uvicorn for this (h11_max_incomplete_event_size)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-exhaustion"), limits={"max_body_bytes": LIMIT}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(shared: RunningGateway) -> str:
    return shared.mint("deployer@app:web-staging", name="exhaustion")


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


def chunked(total: int, size: int = 1000) -> bytes:
    out = b""
    while total > 0:
        piece = min(size, total)
        out += b"%x\r\n" % piece + b"x" * piece + b"\r\n"
        total -= piece
    return out + b"0\r\n\r\n"


def json_of_size(size: int, **fields: str) -> bytes:
    head = "".join(f'"{k}":"{v}",' for k, v in fields.items())
    prefix = ("{" + head + '"pad":"').encode()
    return prefix + b"z" * (size - len(prefix) - 2) + b'"}'


# --- the body limit -------------------------------------------------------------------------------

TE = [(b"Transfer-Encoding", b"chunked")]
OVER: list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes]] = [
    ("declared length one over the limit", METADATA, [], b"x" * (LIMIT + 1)),
    ("declared length of 10 GB, nothing sent", METADATA, [(b"Content-Length", b"10000000000")], b""),
    ("chunked body growing past the limit", METADATA, TE, chunked(LIMIT + 1)),
    ("app-in-body route, declared length over", b"/v1/apps", [], json_of_size(LIMIT + 1, name="web-staging")),
    ("app-in-body route, chunked over", b"/v1/apps", TE, chunked(3 * LIMIT)),
    ("constrained machine body over", MACHINES, [], json_of_size(LIMIT + 1)),
]


@pytest.mark.parametrize(("name", "path", "headers", "body"), OVER, ids=[c[0] for c in OVER])
def test_body_over_the_limit_is_413_and_never_forwarded_whole(name: str, path: bytes,
                                                              headers: list[tuple[bytes, bytes]], body: bytes,
                                                              token: str, gw: RunningGateway) -> None:
    answer = send(gw, request("POST", path, token=token, headers=headers, body=body))
    assert answer.status == 413, answer.body[:300]
    assert answer.error == "too_large"
    # A streamed body may have begun upstream; it is cut off, never completed.
    time.sleep(0.1)
    assert [r for r in gw.upstream.received if r.complete] == []


def test_body_at_the_limit_is_forwarded_exactly(token: str, gw: RunningGateway) -> None:
    body = json_of_size(LIMIT, value="ok")
    answer = send(gw, request("POST", METADATA, token=token, body=body))
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="POST", raw_path=METADATA, body=body, client_tokens=[token])


def test_unauthenticated_huge_body_is_refused_without_reading_it(gw: RunningGateway) -> None:
    started = time.monotonic()
    answer = send(gw, request("POST", METADATA, headers=[(b"Content-Length", b"10000000000")]))
    assert_refused(gw, answer, 401, "unauthenticated")
    assert time.monotonic() - started < 2


# --- header limits ----------------------------------------------------------------------------------

def test_header_section_under_the_limit_is_forwarded(token: str, gw: RunningGateway) -> None:
    value = b"v" * 8192
    answer = send(gw, request("GET", MACHINES, token=token, headers=[(b"User-Agent", value)]))
    assert answer.status == 200, answer.body
    got = assert_forwarded_exactly(gw, method="GET", raw_path=MACHINES, client_tokens=[token])
    assert got.header("user-agent") == [value.decode()]


OVERSIZED: list[tuple[str, bool, list[tuple[bytes, bytes]]]] = [
    ("one 128 KiB header", True, [(b"X-Large", b"v" * (2 * HEADER_SECTION_LIMIT))]),
    ("4000 small headers", True, [(b"X-H%d" % i, b"v" * 20) for i in range(4000)]),
    ("an 8 MiB header before any token", False, [(b"X-Large", b"v" * (8 * 1024 * 1024))]),
]


@pytest.mark.parametrize(("name", "with_token", "headers"), OVERSIZED, ids=[c[0] for c in OVERSIZED])
def test_oversized_header_section_is_refused_by_the_server(name: str, with_token: bool,
                                                           headers: list[tuple[bytes, bytes]], token: str,
                                                           gw: RunningGateway) -> None:
    answer = send(gw, request("GET", MACHINES, token=token if with_token else None, headers=headers), timeout=10)
    assert answer.status in (400, 431), (answer.status, answer.body[:200])
    assert gw.upstream.received == []


# --- slow clients -------------------------------------------------------------------------------------

@dataclass
class Stall:
    ended: bool  # the server closed the connection or answered within the bound
    status: int | None
    elapsed: float


def stall(port: int, data: bytes, bound: float = STALL_BOUND_S) -> Stall:
    """Send `data`, then nothing more; wait up to `bound` for the server to give up on us."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=bound) as sock:
        if data:
            sock.sendall(data)
        received = b""
        while True:
            remaining = started + bound - time.monotonic()
            if remaining <= 0:
                return Stall(False, None, time.monotonic() - started)
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return Stall(False, None, time.monotonic() - started)
            except ConnectionResetError:
                chunk = b""
            if not chunk or b"\r\n\r\n" in received + chunk:
                found = statuses(received + chunk)
                return Stall(True, found[0] if found else None, time.monotonic() - started)
            received += chunk


def auth(token: str) -> bytes:
    return b"Authorization: Bearer " + token.encode() + b"\r\n"


STALLS: list[tuple[str, Callable[[str], bytes]]] = [
    ("connects and sends nothing", lambda t: b""),
    ("stops inside the request line", lambda t: b"GET /v1/apps/web-sta"),
    ("stops inside the headers, before any token", lambda t: b"GET /v1/apps/web-staging HTTP/1.1\r\nHost: x\r\n"),
    ("stops inside the headers, after the token",
     lambda t: b"GET /v1/apps/web-staging HTTP/1.1\r\nHost: x\r\n" + auth(t)),
    ("stops in a streamed body", lambda t: b"POST " + METADATA + b" HTTP/1.1\r\nHost: x\r\n" + auth(t)
     + b"Content-Length: 100\r\n\r\n{\"v\":"),
    ("stops in a body the gateway reads whole", lambda t: b"POST /v1/apps HTTP/1.1\r\nHost: x\r\n" + auth(t)
     + b"Content-Length: 100\r\n\r\n{\"name\":"),
    ("stops inside a chunk", lambda t: b"POST " + METADATA + b" HTTP/1.1\r\nHost: x\r\n" + auth(t)
     + b"Transfer-Encoding: chunked\r\n\r\n10\r\nabc"),
]


@dataclass
class CapStall:
    before: list[int]  # statuses while the idle connections were open and fresh
    after: int | None  # the status of a request once STALL_BOUND_S had passed


def hold_the_cap(gateway: RunningGateway, token: str, cap: int) -> CapStall:
    """Fill the connection cap with idle connections; after the bound, can anyone get in?"""
    with ExitStack() as stack:
        for _ in range(cap):
            stack.enter_context(socket.create_connection(("127.0.0.1", gateway.port), timeout=5))
        time.sleep(0.2)
        before = statuses(converse(gateway.port, request("GET", MACHINES, token=token)))
        time.sleep(STALL_BOUND_S)
        after = statuses(converse(gateway.port, request("GET", MACHINES, token=token)))
    return CapStall(before, after[0] if after else None)


CAP = 8


def capped_gateway(folder: Path, cap: int) -> tuple[RunningGateway, ServerThread]:
    """The gateway's own server stack with a small connection cap (the shipped 2048 is asserted below)."""
    recorder = RecordingUpstream()
    recorder_server = ServerThread(recorder).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CREDENTIAL_ENV, CREDENTIAL)
        config = load_config(write_config(folder, recorder_server.url))
        Keyring.generate(config.tokens_keyring).save()
        state = Services.build(config)
    server = ServerThread(GatewayApp(state), gateway_stack=True)
    server.server.config.limit_concurrency = cap
    server.start()
    return RunningGateway(config, state, server, recorder, folder / "audit.jsonl"), recorder_server


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    gateway, upstream = capped_gateway(tmp_path_factory.mktemp("sec-capped"), CAP)
    try:
        yield gateway
    finally:
        gateway.server.stop()
        upstream.stop()


@dataclass
class Stalls:
    results: dict[str, Stall]
    cap: CapStall
    upstream_complete: int


@pytest.fixture(scope="module")
def stalls(shared: RunningGateway, token: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stalls]:
    """Every slow client at once (so the whole module waits STALL_BOUND_S once, not once per case)."""
    reset(shared)
    held, held_upstream = capped_gateway(tmp_path_factory.mktemp("sec-held"), CAP)
    held_token = held.mint("deployer@app:web-staging", name="held")
    try:
        with ThreadPoolExecutor(max_workers=len(STALLS) + 1) as pool:
            futures = {name: pool.submit(stall, shared.port, build(token)) for name, build in STALLS}
            cap_future = pool.submit(hold_the_cap, held, held_token, CAP)
            results = {name: future.result() for name, future in futures.items()}
            cap = cap_future.result()
        time.sleep(0.2)  # let the upstream record what the gateway cut off
        yield Stalls(results, cap, sum(1 for r in shared.upstream.received if r.complete))
    finally:
        held.server.stop()
        held_upstream.stop()


@pytest.mark.parametrize("name", [name for name, _ in STALLS])
def test_slow_client_is_cut_off_in_bounded_time(name: str, stalls: Stalls) -> None:
    result = stalls.results[name]
    assert result.ended, f"the connection was still open after {result.elapsed:.1f}s (bound {STALL_BOUND_S}s)"
    assert result.status in (None, 400, 408, 413, 504)
    assert stalls.upstream_complete == 0


def test_idle_connections_cannot_hold_the_connection_cap_forever(stalls: Stalls) -> None:
    """With every slot taken by connections that never send a byte, newcomers get 503 at first;
    once the idle ones have been cut off (STALL_BOUND_S), service resumes."""
    assert stalls.cap.before == [503]
    assert stalls.cap.after == 200, f"still {stalls.cap.after} after {STALL_BOUND_S}s of idle connections"


# --- the connection cap -------------------------------------------------------------------------------

def test_shipped_server_config_caps_connections_and_header_size() -> None:
    config = uvicorn_config(object(), host="127.0.0.1", port=0)
    assert config.limit_concurrency == 2048
    assert config.h11_max_incomplete_event_size == HEADER_SECTION_LIMIT


@pytest.mark.parametrize(("idle", "status"), [(CAP - 2, 200), (CAP - 1, 503), (3 * CAP, 503)],
                         ids=["below the cap", "at the cap", "far beyond the cap"])
def test_connections_beyond_the_cap_get_503_and_nothing_is_forwarded(idle: int, status: int,
                                                                     capped: RunningGateway) -> None:
    token = capped.mint("viewer@app:web-staging", name=f"cap-{idle}")
    reset(capped)
    with ExitStack() as stack:
        for _ in range(idle):
            stack.enter_context(socket.create_connection(("127.0.0.1", capped.port), timeout=5))
        assert wait_for(lambda: len(capped.server.server.server_state.connections) >= min(idle, 3 * CAP))
        answer = statuses(converse(capped.port, request("GET", MACHINES, token=token)))
    assert answer == [status]
    if status == 200:
        assert_forwarded_exactly(capped, method="GET", raw_path=MACHINES, client_tokens=[token])
    else:
        assert capped.upstream.received == []
    # Once the idle connections are gone, the gateway serves again.
    assert wait_for(lambda: len(capped.server.server.server_state.connections) == 0)
    reset(capped)
    assert statuses(converse(capped.port, request("GET", MACHINES, token=token))) == [200]
