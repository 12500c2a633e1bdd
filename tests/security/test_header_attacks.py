"""Header attacks: spoofed forwarding headers, hop-by-hop nominations, CRLF, and request smuggling.

What the gateway asserts about a request (client address, scheme, host, request id) it sets
itself; what would re-target or re-authenticate the request upstream (X-Original-URL, a client
Authorization named hop-by-hop) never gets there as sent. Framing the server cannot read one way
only (Transfer-Encoding with Content-Length, duplicated lengths, obs-fold) is refused before the
gateway sees it; pipelined and embedded requests are separate requests, each authorized on its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.conftest import RunningGateway
from tests.security.harness import (
    HOST,
    assert_forwarded_exactly,
    assert_nothing_forwarded,
    assert_refused,
    converse,
    request,
    reset,
    running_gateway,
    send,
    statuses,
)

TARGET = b"/v1/apps/web-staging/machines"
METADATA = b"/v1/apps/web-staging/machines/m1/metadata/role"  # POST: metadata:write, no body constraint


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-headers")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(shared: RunningGateway) -> str:
    return shared.mint("deployer@app:web-staging", name="headers")


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


# --- what the gateway asserts, it sets --------------------------------------------------------

# (name, header sent by the client, the header's values upstream: None = the gateway's own request id)
SPOOFED: list[tuple[str, tuple[bytes, bytes], str, list[str] | None]] = [
    ("X-Forwarded-For", (b"X-Forwarded-For", b"6.6.6.6"), "x-forwarded-for", ["127.0.0.1"]),
    ("X-Forwarded-For list", (b"X-Forwarded-For", b"10.0.0.1, 6.6.6.6"), "x-forwarded-for", ["127.0.0.1"]),
    ("X-Forwarded-Proto", (b"X-Forwarded-Proto", b"https"), "x-forwarded-proto", ["http"]),
    ("X-Forwarded-Host", (b"X-Forwarded-Host", b"web-prod.internal"), "x-forwarded-host", [HOST.decode()]),
    ("X-Forwarded-Port", (b"X-Forwarded-Port", b"443"), "x-forwarded-port", []),
    ("X-Forwarded-Scheme", (b"X-Forwarded-Scheme", b"https"), "x-forwarded-scheme", []),
    ("X-Forwarded-Prefix", (b"X-Forwarded-Prefix", b"/v1/apps/web-prod"), "x-forwarded-prefix", []),
    ("Forwarded", (b"Forwarded", b"for=6.6.6.6;host=web-prod.internal;proto=https"), "forwarded", []),
    ("X-Real-IP", (b"X-Real-IP", b"6.6.6.6"), "x-real-ip", []),
    ("X-Request-Id", (b"X-Request-Id", b"client-chosen"), "x-request-id", None),
    ("X-Original-URL", (b"X-Original-URL", b"/v1/apps/web-prod/machines"), "x-original-url", []),
    ("X-Rewrite-URL", (b"X-Rewrite-URL", b"/v1/apps/web-prod/machines"), "x-rewrite-url", []),
    ("Proxy-Authorization", (b"Proxy-Authorization", b"Basic YWRtaW46YWRtaW4="), "proxy-authorization", []),
    ("Keep-Alive", (b"Keep-Alive", b"timeout=600"), "keep-alive", []),
    ("TE", (b"TE", b"trailers"), "te", []),
    ("Upgrade h2c", (b"Upgrade", b"h2c"), "upgrade", []),
    ("Proxy-Connection", (b"Proxy-Connection", b"keep-alive"), "proxy-connection", []),
]


@pytest.mark.parametrize(("name", "sent", "header", "expected"), SPOOFED, ids=[c[0] for c in SPOOFED])
def test_client_cannot_assert_what_the_gateway_asserts(name: str, sent: tuple[bytes, bytes], header: str,
                                                       expected: list[str] | None, token: str,
                                                       gw: RunningGateway) -> None:
    answer = send(gw, request("GET", TARGET, token=token, headers=[sent]))
    assert answer.status == 200, answer.body
    got = assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])
    if expected is None:
        assert got.header(header) == [answer.headers["x-request-id"]]
        assert sent[1].decode() not in got.header(header)
    else:
        assert got.header(header) == expected


def test_host_is_the_upstreams_and_the_clients_host_is_only_reported(token: str, gw: RunningGateway) -> None:
    answer = send(gw, request("GET", TARGET, token=token, host=b"web-prod.internal"))
    assert answer.status == 200, answer.body
    got = assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])
    upstream_authority = gw.config.upstream_url.removeprefix("http://").rstrip("/")
    assert got.header("host") == [upstream_authority]
    assert got.header("x-forwarded-host") == ["web-prod.internal"]


@pytest.mark.parametrize("target", [b"/_gateway/v1/tokens/", b"/_gateway/healthz/", b"/_gateway/v1/explain/",
                                    b"/.well-known/jwks.json/", b"/_gateway/v1/tokens/abc/rotate/"])
def test_no_redirect_or_absolute_url_is_built_from_the_clients_host(target: bytes, token: str,
                                                                    gw: RunningGateway) -> None:
    """A trailing slash on a gateway endpoint is not redirected to `http://<client Host>/...` (the
    web framework's slash redirect would be): it is a 404 naming the path, with no Location."""
    admin = gw.mint("token-admin@gateway", name="slash-admin")
    answer = send(gw, request("GET", target, token=admin, host=b"evil.example"))
    assert answer.status == 404, answer.body
    assert "location" not in answer.headers
    assert b"evil.example" not in answer.body and "evil.example" not in repr(answer.headers)
    assert json.loads(answer.body)["error"] == "not_found"
    assert_nothing_forwarded(gw)


def test_two_host_headers_are_refused(token: str, gw: RunningGateway) -> None:
    """RFC 9112 section 3.2: a request with more than one Host is answered 400."""
    answer = send(gw, request("GET", TARGET, token=token, headers=[(b"Host", b"web-prod.internal")]))
    assert_refused(gw, answer, 400)


# --- Connection nominations --------------------------------------------------------------------

CONNECTION = [
    b"authorization",
    b"Authorization, close",
    b"authorization, x-forwarded-for, x-forwarded-host, x-request-id",
    b"proxy-authorization",
    b"host",
]


@pytest.mark.parametrize("nominated", CONNECTION, ids=[c.decode() for c in CONNECTION])
def test_connection_nominating_gateway_headers_changes_nothing_upstream(nominated: bytes, token: str,
                                                                        gw: RunningGateway) -> None:
    """Naming Authorization (or X-Forwarded-*) hop-by-hop must neither drop the injected credential
    nor let the client's token through."""
    data = request("GET", TARGET, token=token, close=False,
                   headers=[(b"Connection", nominated), (b"Proxy-Authorization", b"Bearer " + token.encode())])
    answer = send(gw, data.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    assert answer.status == 200, answer.body
    got = assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])
    assert got.header("x-forwarded-for") == ["127.0.0.1"]
    assert got.header("x-forwarded-host") == [HOST.decode()]
    assert len(got.header("x-request-id")) == 1
    assert got.header("connection") in ([], ["keep-alive"], ["close"])


# --- CRLF and malformed header lines --------------------------------------------------------------

MALFORMED: list[tuple[str, bytes]] = [
    ("bare LF injecting a header", b"X-Note: a\nAuthorization: Bearer sgt_injected"),
    ("bare CR injecting a header", b"X-Note: a\rX-Forwarded-For: 6.6.6.6"),
    ("obs-fold continuation", b"X-Note: a\r\n X-Forwarded-For: 6.6.6.6"),
    ("NUL in a value", b"X-Note: a\x00b"),
    ("space before the colon", b"Authorization : Bearer sgt_other"),
    ("space inside a name", b"X Forwarded For: 6.6.6.6"),
    ("non-token character in a name", b"X-Note(): a"),
    ("non-ASCII byte in a name", b"X-N\xc3\xb6te: a"),
    ("header line without a colon", b"X-Forwarded-For 6.6.6.6"),
]


@pytest.mark.parametrize(("name", "line"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_header_line_is_refused(name: str, line: bytes, token: str, gw: RunningGateway) -> None:
    data = request("GET", TARGET, token=token).replace(b"\r\nConnection: close",
                                                       b"\r\n" + line + b"\r\nConnection: close")
    assert_refused(gw, send(gw, data), 400)


def test_encoded_crlf_in_a_value_is_forwarded_literally(token: str, gw: RunningGateway) -> None:
    value = b"a%0d%0aX-Forwarded-For:%206.6.6.6"
    answer = send(gw, request("GET", TARGET, token=token, headers=[(b"User-Agent", value)]))
    assert answer.status == 200, answer.body
    got = assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])
    assert got.header("user-agent") == [value.decode()]
    assert got.header("x-forwarded-for") == ["127.0.0.1"]


# --- request smuggling ------------------------------------------------------------------------------

def framed(headers: bytes, body: bytes, token: str) -> bytes:
    return (b"POST " + METADATA + b" HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer " + token.encode()
            + b"\r\n" + headers + b"Connection: close\r\n\r\n" + body)


SMUGGLED = b"GET /v1/apps/web-prod/secrets?show_secrets=true HTTP/1.1\r\nHost: x\r\n\r\n"
AMBIGUOUS: list[tuple[str, bytes, bytes]] = [
    ("Transfer-Encoding with Content-Length", b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
     b"0\r\n\r\n" + SMUGGLED),
    ("Content-Length with Transfer-Encoding", b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
     b"0\r\n\r\n" + SMUGGLED),
    ("two different Content-Lengths", b"Content-Length: 2\r\nContent-Length: 70\r\n", b"{}" + SMUGGLED),
    ("two equal Content-Lengths", b"Content-Length: 2\r\nContent-Length: 2\r\n", b"{}"),
    ("Content-Length list", b"Content-Length: 2, 2\r\n", b"{}"),
    ("Content-Length with a plus sign", b"Content-Length: +2\r\n", b"{}"),
    ("Content-Length in hex", b"Content-Length: 0x2\r\n", b"{}"),
    ("chunked then identity", b"Transfer-Encoding: chunked, identity\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
    ("xchunked", b"Transfer-Encoding: xchunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
    ("Transfer-Encoding twice", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
     b"2\r\n{}\r\n0\r\n\r\n"),
    ("Transfer-Encoding obs-folded", b"Transfer-Encoding:\r\n chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
    ("space before the colon of Transfer-Encoding", b"Transfer-Encoding : chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
    ("chunk size with garbage", b"Transfer-Encoding: chunked\r\n", b"2x\r\n{}\r\n0\r\n\r\n"),
    ("chunk lines ended by bare LF", b"Transfer-Encoding: chunked\r\n", b"2\n{}\n0\n\n"),
    ("chunk longer than its size", b"Transfer-Encoding: chunked\r\n", b"1\r\n{}\r\n0\r\n\r\n" + SMUGGLED),
    ("Content-Length in a trailer", b"Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\nContent-Length: 70\r\n\r\n"),
]


@pytest.mark.parametrize(("name", "headers", "body"), AMBIGUOUS, ids=[c[0] for c in AMBIGUOUS])
def test_ambiguous_framing_never_reaches_the_upstream_as_a_request(name: str, headers: bytes, body: bytes,
                                                                   token: str, gw: RunningGateway) -> None:
    answer = converse(gw.port, framed(headers, body, token))
    assert statuses(answer)[:1] == [400], answer[:300]
    # The gateway may have begun streaming before the framing broke: the upstream may see a cut-off
    # request it never acts on, but no complete one, and never the smuggled second request.
    time.sleep(0.2)
    assert [r for r in gw.upstream.received if r.complete] == []
    assert all(b"web-prod" not in r.raw_path for r in gw.upstream.received)


def test_pipelined_request_without_a_token_is_not_authorized_by_the_first(token: str, gw: RunningGateway) -> None:
    first = request("GET", TARGET, token=token, close=False)
    second = request("GET", b"/v1/apps/web-staging/secrets", token=None)
    answer = converse(gw.port, first + second)
    assert statuses(answer) == [200, 401]
    assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])


def test_request_after_an_empty_body_is_a_separate_request_authorized_on_its_own(token: str,
                                                                                 gw: RunningGateway) -> None:
    first = request("POST", METADATA, token=token, close=False, headers=[(b"Content-Length", b"0")])
    second = request("GET", b"/v1/apps/web-prod/machines", token=token)
    answer = converse(gw.port, first + second)
    assert statuses(answer) == [200, 403]
    assert_forwarded_exactly(gw, method="POST", raw_path=METADATA, client_tokens=[token])


def test_request_inside_a_declared_body_is_only_body(token: str, gw: RunningGateway) -> None:
    body = json.dumps({"value": SMUGGLED.decode()}).encode()
    answer = send(gw, request("POST", METADATA, token=token, body=body))
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="POST", raw_path=METADATA, body=body, client_tokens=[token])


def test_trailer_fields_are_not_promoted_to_request_headers(token: str, gw: RunningGateway) -> None:
    """RFC 9110 section 6.5.1: a trailer field must not be merged into the header section it did not
    belong to. The gateway reads POST /v1/apps bodies (chunked here) before it builds the upstream
    headers; what arrived after the body must not turn into headers of the forwarded request."""
    body = b'{"name":"web-staging"}'
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\nX-Trailer-Injected: 1\r\nFly-Force-Instance-Id: 0\r\n\r\n"
    answer = send(gw, request("POST", b"/v1/apps", token=token, body=chunked,
                              headers=[(b"Transfer-Encoding", b"chunked")]))
    if answer.status == 400:  # refusing trailers altogether is fine too
        assert_refused(gw, answer, 400)
        return
    assert answer.status == 200, answer.body
    got = assert_forwarded_exactly(gw, method="POST", raw_path=b"/v1/apps", body=body, client_tokens=[token])
    assert got.header("x-trailer-injected") == []
    assert got.header("fly-force-instance-id") == []


def test_nothing_reaches_the_upstream_from_a_refused_pipeline(token: str, gw: RunningGateway) -> None:
    first = request("GET", b"/v1/apps/web-prod/machines", token=token, close=False)
    second = request("DELETE", b"/v1/apps/web-prod", token=token)
    answer = converse(gw.port, first + second)
    assert statuses(answer) == [403, 403]
    assert_nothing_forwarded(gw)
