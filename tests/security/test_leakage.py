"""Leakage: the upstream credential and client tokens never show up where they should not.

Not in responses (relayed upstream errors and redirects included), not in a followed redirect
(redirects are relayed, never followed, so the credential is never sent anywhere else), not in the
audit log, not in any log line (the gateway's, uvicorn's, aiohttp's) and not on stderr/stdout,
including when the upstream is down, times out, or the gateway fails unexpectedly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from gateway.server import uvicorn_config
from tests.conftest import CREDENTIAL_ENV, RunningGateway, start_gateway
from tests.security.harness import (
    CREDENTIAL,
    Answer,
    LogCapture,
    assert_forwarded_exactly,
    assert_nothing_forwarded,
    assert_refused,
    audit_record,
    request,
    reset,
    running_gateway,
    send,
    wait_for,
)
from tests.servers import RecordingUpstream, Reply, ServerThread

TARGET = b"/v1/apps/web-staging"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-leakage"), upstream={"read_timeout_s": 0.5}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def attacker() -> Iterator[tuple[RecordingUpstream, ServerThread]]:
    """Where a malicious (or compromised) upstream answer would like the gateway to go next."""
    recorder = RecordingUpstream()
    server = ServerThread(recorder).start()
    yield recorder, server
    server.stop()


@pytest.fixture(scope="module")
def dead(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway whose upstream has gone away (its port is closed)."""
    recorder = RecordingUpstream()
    server = ServerThread(recorder).start()
    server.stop()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CREDENTIAL_ENV, CREDENTIAL)
        gateway = start_gateway(tmp_path_factory.mktemp("sec-leakage-dead"), recorder, server)
        try:
            yield gateway
        finally:
            gateway.server.stop()


@pytest.fixture(scope="module")
def token(shared: RunningGateway) -> str:
    return shared.mint("admin@app:web-staging", name="leakage")


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


def secret_free(answer: Answer, *tokens: str) -> None:
    everything = answer.body + json.dumps(answer.headers).encode()
    assert CREDENTIAL.encode() not in everything
    assert CREDENTIAL.encode() not in answer.body.replace(b"\\", b"")
    for token in tokens:
        assert token.encode() not in everything
        assert token.removeprefix("sgt_").encode() not in everything


# --- relayed upstream answers -----------------------------------------------------------------

RELAYED: list[tuple[str, Reply]] = [
    ("upstream 500 error body", Reply(status=500, body=b'{"error":"internal","detail":"db down"}')),
    ("upstream 401 with its own challenge", Reply(status=401, body=b'{"error":"unauthorized"}', headers=[
        (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="fly"')])),
    ("upstream 403 naming the org", Reply(status=403, body=b'{"error":"not allowed for org acme"}')),
    ("upstream 422 validation error", Reply(status=422, body=b'{"error":"name_taken"}')),
]


@pytest.mark.parametrize(("name", "reply"), RELAYED, ids=[n for n, _ in RELAYED])
def test_upstream_error_is_relayed_as_it_came_and_adds_no_secret(name: str, reply: Reply, token: str,
                                                                 gw: RunningGateway) -> None:
    gw.upstream.reply = reply
    answer = send(gw, request("GET", TARGET, token=token))
    assert answer.status == reply.status
    assert answer.body == reply.body
    for header, value in reply.headers:
        assert answer.headers[header.decode()] == value.decode()
    assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])
    secret_free(answer, token)


REDIRECTS = [301, 302, 303, 307, 308]


@pytest.mark.parametrize("status", REDIRECTS, ids=[f"redirect {s}" for s in REDIRECTS])
def test_redirect_to_another_host_is_relayed_never_followed(status: int, token: str, gw: RunningGateway,
                                                           attacker: tuple[RecordingUpstream, ServerThread]) -> None:
    recorder, server = attacker
    recorder.clear()
    location = f"{server.url}/collect?from=scopegate".encode()
    gw.upstream.reply = Reply(status=status, body=b"", headers=[(b"location", location)])
    answer = send(gw, request("POST", TARGET + b"/machines/m1/stop", token=token, body=b"{}"))
    assert answer.status == status
    assert answer.headers["location"] == location.decode()
    assert_forwarded_exactly(gw, method="POST", raw_path=TARGET + b"/machines/m1/stop", body=b"{}",
                             client_tokens=[token])
    assert recorder.received == []  # the credential went nowhere else
    secret_free(answer, token)


def test_relative_redirect_is_not_followed_to_another_path(token: str, gw: RunningGateway) -> None:
    gw.upstream.reply = Reply(status=307, body=b"", headers=[(b"location", b"/v1/apps/web-prod/machines")])
    answer = send(gw, request("GET", TARGET, token=token))
    assert answer.status == 307
    assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])


# --- failures ---------------------------------------------------------------------------------------

def test_upstream_down_is_502_without_a_secret(token: str, dead: RunningGateway) -> None:
    answer = send(dead, request("GET", TARGET, token=dead.mint("viewer@app:web-staging")))
    assert answer.status == 502
    assert answer.error == "upstream_unavailable"
    secret_free(answer, token)


def test_upstream_timeout_is_504_without_a_secret(token: str, gw: RunningGateway) -> None:
    gw.upstream.reply = Reply(delay_s=1.5)
    answer = send(gw, request("GET", TARGET, token=token))
    assert answer.status == 504
    assert answer.error == "upstream_timeout"
    secret_free(answer, token)


def test_current_token_is_answered_by_the_gateway_not_the_upstream(token: str, gw: RunningGateway) -> None:
    answer = send(gw, request("GET", b"/v1/tokens/current", token=token))
    assert answer.status == 200
    assert answer.json()["source"] == "scopegate"
    assert_nothing_forwarded(gw)
    secret_free(answer, token)


def test_gateway_endpoints_show_no_secret(token: str, gw: RunningGateway) -> None:
    admin = gw.mint("token-admin@gateway", name="leak-admin")
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        answers = [
            client.get("/_gateway/healthz"), client.get("/_gateway/readyz"), client.get("/_gateway/metrics"),
            client.get("/.well-known/jwks.json"),
            client.get("/_gateway/v1/tokens", headers={"Authorization": f"Bearer {admin}"}),
            client.post("/_gateway/v1/explain", headers={"Authorization": f"Bearer {admin}"},
                        json={"method": "GET", "path": "/v1/apps/web-staging", "token": token}),
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 200, 200]
    for answer in answers:
        assert CREDENTIAL not in answer.text
        assert token not in answer.text and token.removeprefix("sgt_") not in answer.text
        assert admin not in answer.text
        assert '"d"' not in answer.text  # no private key component in the JWKS
    assert_nothing_forwarded(gw)


# --- the audit log and the logs -----------------------------------------------------------------------

def test_token_sent_as_a_path_segment_is_not_written_to_the_audit_log(token: str, gw: RunningGateway) -> None:
    """A client that pastes its token into the URL path (a misconfigured base URL) gets a 400, and
    the audit log, which DESIGN section 12 says never holds a token string, does not keep it."""
    answer = send(gw, request("GET", b"/v1/apps/" + token.encode(), token=token))
    assert_refused(gw, answer, (400, 401))
    audit_record(gw, answer)  # written just after the answer: wait for it
    audit = gw.audit_text()
    assert token not in audit
    assert token.removeprefix("sgt_") not in audit


def nested_listing() -> Reply:
    depth = 100_000
    return Reply(body=b'{"apps":' + b"[" * depth + b"]" * depth + b"}")


def test_no_secret_in_any_log_line_audit_record_or_output(token: str, gw: RunningGateway,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    revoked = gw.mint("viewer@app:web-staging", name="to-revoke")
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    audit_before = len(gw.audit_text()) if gw.audit_file.exists() else 0
    with LogCapture().attached() as logs:
        outcomes = []
        for reply, data in [
            (Reply(), request("GET", TARGET, token=token)),
            (Reply(), request("GET", TARGET, token=forged)),
            (Reply(), request("GET", TARGET + b"?access_token=" + token.encode(), token=token)),
            (Reply(), request("GET", b"/v1/apps/web-prod", token=token)),
            (Reply(), request("TRACE", TARGET, token=token)),
            (Reply(), request("GET", TARGET + b"/..", token=token)),
            (Reply(status=500, body=b"boom"), request("GET", TARGET, token=token)),
            (Reply(delay_s=1.5), request("GET", TARGET, token=token)),
            (nested_listing(), request("GET", b"/v1/apps?org_slug=acme", token=token)),
            (Reply(), request("get", TARGET, token=token)),
            (Reply(), request("GET", TARGET, token=revoked)),
        ]:
            gw.upstream.reply = reply
            outcomes.append(send(gw, data).status)
    assert outcomes == [200, 401, 401, 403, 403, 400, 500, 504, 500, 400, 200]
    # The capture works: the unexpected failure (a listing too deeply nested to parse) was logged.
    assert any("RecursionError" in line for line in logs.lines), logs.lines
    captured = capfd.readouterr()
    # Every request that reached the gateway's application is audited (the server refuses `get` itself).
    assert wait_for(lambda: gw.audit_text()[audit_before:].count("\n") >= len(outcomes) - 1)
    audit = gw.audit_text()[audit_before:]
    for where, text in [("logs", "\n".join(logs.lines)), ("stdout", captured.out), ("stderr", captured.err),
                        ("audit", audit)]:
        assert CREDENTIAL not in text, where
        for secret in (token, forged, revoked):
            assert secret not in text, where
            assert secret.removeprefix("sgt_") not in text, where


def test_access_log_is_off_so_request_targets_are_never_logged() -> None:
    """uvicorn's access log writes the whole target, query included (where a client may have put its
    token): the gateway's server config keeps it off."""
    config = uvicorn_config(object(), host="127.0.0.1", port=0)
    assert config.access_log is False
    assert logging.getLogger("uvicorn.access").handlers == []
