"""What the upstream receives, and what the client gets back, through a real gateway."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import GatewayApp
from gateway.config import load_config
from gateway.core.keyring import Keyring
from gateway.services import Services
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway, write_config
from tests.servers import RecordingUpstream, Reply, ServerThread, raw_request


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_client_credentials_and_hop_by_hop_headers_never_reach_the_upstream(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging")
    request = (
        b"POST /v1/apps/web-staging/machines/m1/lease HTTP/1.1\r\n"
        b"Host: gateway.example\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"Connection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: should-go\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"X-Forwarded-Proto: gopher\r\n"
        b"Forwarded: for=6.6.6.6\r\n"
        b"X-Real-IP: 6.6.6.6\r\n"
        b"X-Request-Id: client-chosen\r\n"
        b"X-Original-URL: /v1/apps/web-prod\r\n"
        b"X-HTTP-Method-Override: DELETE\r\n"
        b"fly-machine-lease-nonce: nonce-123\r\n"
        b"User-Agent: flyctl/0.3\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    status, headers, _ = raw_request(gateway.port, request)
    assert status == 200
    (got,) = gateway.upstream.received
    names = {k.decode() for k, _ in got.headers}
    for dropped in ("proxy-authorization", "x-secret-hop", "keep-alive", "te", "upgrade", "forwarded",
                    "x-real-ip", "x-original-url", "x-http-method-override"):
        assert dropped not in names, dropped
    assert got.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]
    assert got.header("x-forwarded-for") == ["127.0.0.1"]
    assert got.header("x-forwarded-proto") == ["http"]
    assert got.header("x-forwarded-host") == ["gateway.example"]
    request_id = got.header("x-request-id")
    assert request_id and request_id[0] != "client-chosen"
    assert headers["x-request-id"] == request_id[0]
    assert got.header("fly-machine-lease-nonce") == ["nonce-123"]
    assert got.header("user-agent") == ["flyctl/0.3"]
    assert got.body == b"{}"
    assert token not in repr(got.headers)


def test_upstream_scheme_flyv1_is_injected(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = start_gateway(tmp_path, *upstream, upstream={"auth_scheme": "FlyV1"})
    try:
        token = running.mint("viewer@app:web")
        with running.client() as client:
            assert client.get("/v1/apps/web", headers={"Authorization": f"FlyV1 {token}"}).status_code == 200
        assert running.upstream.received[0].header("authorization") == [f"FlyV1 {UPSTREAM_SECRET}"]
    finally:
        running.server.stop()


def test_query_parameters_are_forwarded_unchanged(gateway: RunningGateway) -> None:
    token = gateway.mint("admin@app:web")
    with gateway.client() as client:
        response = client.delete("/v1/apps/web/machines/m1?kill=true&force=true&x=%2F", headers=auth(token))
    assert response.status_code == 200
    assert gateway.upstream.received[0].raw_path == b"/v1/apps/web/machines/m1"
    assert gateway.upstream.received[0].query == b"kill=true&force=true&x=%2F"


def test_response_status_headers_and_body_are_relayed(gateway: RunningGateway) -> None:
    payload = b"x" * (3 * 1024 * 1024 + 17)
    gateway.upstream.reply = Reply(status=418, body=payload, headers=[
        (b"content-type", b"application/octet-stream"), (b"fly-request-id", b"01ABC"), (b"set-cookie", b"a=b")])
    token = gateway.mint("viewer@app:web")
    with gateway.client() as client:
        response = client.get("/v1/apps/web/machines", headers=auth(token))
    assert response.status_code == 418
    assert response.content == payload
    assert response.headers["fly-request-id"] == "01ABC"
    assert response.headers["set-cookie"] == "a=b"


def test_request_body_streams_through_chunked(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web")
    parts = [b'{"config":', b'{"image":"registry.fly.io/web:1"}', b"}"]

    def body() -> Iterator[bytes]:
        yield from parts

    with gateway.client() as client:
        response = client.post("/v1/apps/web/machines", content=body(), headers=auth(token))
    assert response.status_code == 200
    assert gateway.upstream.received[0].body == b"".join(parts)


def test_declared_body_over_the_limit_is_413_and_not_forwarded(
        tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = start_gateway(tmp_path, *upstream, limits={"max_body_bytes": 1000})
    try:
        token = running.mint("deployer@app:web", "deployer@app:web-pr-*")
        with running.client() as client:
            big = client.post("/v1/apps/web/machines", content=b"x" * 1001, headers=auth(token))
            assert big.status_code == 413
            assert big.json()["error"] == "too_large"

            def chunks() -> Iterator[bytes]:
                for _ in range(20):
                    yield b"y" * 100

            streamed = client.post("/v1/apps/web/machines", content=chunks(), headers=auth(token))
            assert streamed.status_code == 413
            body_route = client.post("/v1/apps", content=json.dumps({"name": "web-pr-1", "pad": "z" * 2000}),
                                     headers=auth(token))
            assert body_route.status_code == 413
            # Exactly at the limit passes (a JSON body: constraints read machine bodies).
            prefix = b'{"config":{},"name":"'
            at_limit = prefix + b"x" * (1000 - len(prefix) - 2) + b'"}'
            ok = client.post("/v1/apps/web/machines", content=at_limit, headers=auth(token))
            assert ok.status_code == 200, ok.text
        complete = [r for r in running.upstream.received if r.complete and r.method == "POST"]
        assert len(complete) == 1 and complete[0].body == at_limit
    finally:
        running.server.stop()


def test_upstream_down_is_502(gateway: RunningGateway, upstream: tuple[RecordingUpstream, ServerThread]) -> None:
    token = gateway.mint("viewer@app:web")
    upstream[1].stop()
    with gateway.client() as client:
        response = client.get("/v1/apps/web", headers=auth(token))
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_unavailable"
    assert UPSTREAM_SECRET not in response.text


def test_slow_upstream_is_504(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = start_gateway(tmp_path, *upstream, upstream={"read_timeout_s": 0.3})
    running.upstream.reply = Reply(delay_s=1.5)
    try:
        token = running.mint("viewer@app:web")
        started = time.monotonic()
        with running.client() as client:
            response = client.get("/v1/apps/web", headers=auth(token))
        assert response.status_code == 504
        assert response.json()["error"] == "upstream_timeout"
        assert time.monotonic() - started < 1.4
    finally:
        running.server.stop()


def test_redirects_are_relayed_not_followed(gateway: RunningGateway) -> None:
    gateway.upstream.reply = Reply(status=302, body=b"", headers=[(b"location", b"http://127.0.0.1:1/elsewhere")])
    token = gateway.mint("viewer@app:web")
    with gateway.client() as client:
        response = client.get("/v1/apps/web", headers=auth(token))
    assert response.status_code == 302
    assert response.headers["location"] == "http://127.0.0.1:1/elsewhere"
    assert len(gateway.upstream.received) == 1


def test_app_listing_is_filtered_to_the_apps_the_token_covers(gateway: RunningGateway) -> None:
    listing = {"total_apps": 4, "apps": [{"name": n, "organization": {"slug": "acme"}}
                                          for n in ("web-staging", "web-prod", "api-staging", "web-pr-7")]}
    gateway.upstream.reply = Reply(body=json.dumps(listing).encode())
    cases = {
        ("viewer@app:web-staging",): ["web-staging"],
        ("deployer@env:staging",): ["web-staging", "api-staging"],
        # A pattern grant stays in its pattern's environment: web-* (development), web*-prod (production).
        ("viewer@app:web-*",): ["web-pr-7"],
        ("viewer@app:web*-prod",): ["web-prod"],
        ("viewer@app:nothing-here",): [],
    }
    with gateway.client() as client:
        for grants, expected in cases.items():
            token = gateway.mint(*grants)
            response = client.get("/v1/apps?org_slug=acme", headers=auth(token))
            assert response.status_code == 200, grants
            body = response.json()
            assert [a["name"] for a in body["apps"]] == expected, grants
            assert body["total_apps"] == len(expected)
        assert gateway.upstream.received[-1].query == b"org_slug=acme"


def test_unfilterable_listing_is_withheld(gateway: RunningGateway) -> None:
    gateway.upstream.reply = Reply(body=b"not json")
    token = gateway.mint("viewer@app:web")
    with gateway.client() as client:
        response = client.get("/v1/apps?org_slug=acme", headers=auth(token))
    assert response.status_code == 500
    assert "not json" not in response.text


def test_current_token_is_answered_by_the_gateway(gateway: RunningGateway) -> None:
    token = gateway.mint("viewer@app:web", name="who-am-i")
    with gateway.client() as client:
        response = client.get("/v1/tokens/current", headers=auth(token))
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "who-am-i" and body["grants"] == ["viewer@app:web"] and body["source"] == "scopegate"
    assert gateway.upstream.received == []


def test_gateway_endpoints_are_never_forwarded(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        assert client.get("/_gateway/healthz").json() == {"status": "ok"}
        ready = client.get("/_gateway/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        jwks = client.get("/.well-known/jwks.json").json()
        assert [k["kid"] for k in jwks["keys"]] == [gateway.services.keyring.active.kid]
        assert all("d" not in k for k in jwks["keys"])
        assert client.get("/_gateway/nope").status_code == 404
    assert gateway.upstream.received == []


def test_nothing_forwarded_without_a_token_even_for_known_routes(gateway: RunningGateway) -> None:
    with httpx.Client(base_url=gateway.url) as client:
        for method, path in (("GET", "/v1/apps/web"), ("POST", "/v1/apps"), ("GET", "/v1/platform/regions")):
            response = client.request(method, path)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert gateway.upstream.received == []


class RequestLineUpstream:
    """A bare TCP upstream that keeps each request line as it arrived on the wire (uvicorn's scope
    cannot tell `/x?` from `/x`) and answers 200 with `Connection: close`."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.lines: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.lines.append(data.partition(b"\r\n")[0])
                connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                                   b"connection: close\r\n\r\n{}")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("target", [b"/v1/apps/web-staging?", b"/v1/apps/web-staging", b"/v1/apps/web-staging?a=1"])
def test_the_target_reaches_the_upstream_byte_for_byte_a_bare_question_mark_included(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: bytes) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    upstream = RequestLineUpstream()
    config = load_config(write_config(tmp_path, upstream.url))
    Keyring.generate(config.tokens_keyring).save()
    services = Services.build(config)
    running = RunningGateway(config, services, ServerThread(GatewayApp(services), gateway_stack=True).start(),
                             RecordingUpstream(), tmp_path / "audit.jsonl")
    try:
        token = running.mint("viewer@app:web-staging")
        request = b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
        status, _, _ = raw_request(running.port, request)
        assert status == 200
        assert upstream.lines == [b"GET " + target + b" HTTP/1.1"]
    finally:
        running.server.stop()
        upstream.close()
