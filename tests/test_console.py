"""The web console over plain HTTP (httpx against a real gateway): sessions, CSRF, headers, who
sees what, escaping, and that console actions are the admin API's (same registry, same audit).
The browser itself drives it in tests/test_console_browser.py."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.console.views import ListQuery, cascade, filter_page, lineage
from gateway.store import TokenRecord
from tests.conftest import RunningGateway, start_gateway
from tests.servers import RecordingUpstream, ServerThread

UI = "/_gateway/ui"
XSS = "<img src=x onerror=alert(1)>"


OPEN: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def client_of(gateway: RunningGateway) -> httpx.Client:
    client = gateway.client()
    OPEN.append(client)
    return client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def sign_in(gateway: RunningGateway, token: str) -> httpx.Client:
    client = client_of(gateway)
    form = client.get(f"{UI}/signin")
    answer = client.post(f"{UI}/signin", data={"csrf": csrf_of(form.text), "token": token})
    assert answer.status_code == 303, answer.text
    return client


def jti_of(token: str, gateway: RunningGateway) -> str:
    return gateway.services.authorizer.verifier.verify(token).jti


def test_every_page_carries_the_security_headers(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    client = sign_in(gateway, admin)
    for path in ("/signin", "/tokens", "/mint", "/audit", "/explain", "/static/console.css", "/nope"):
        answer = client.get(UI + path)
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
    # No inline script or style anywhere: scripts are files, styles one stylesheet.
    for path in ("/tokens", "/mint", "/audit", "/explain"):
        html = client.get(UI + path).text
        assert "<script>" not in html and "style=" not in html and "<style" not in html and "onclick" not in html


def test_the_session_cookie_and_the_token_never_shown_back(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    client = client_of(gateway)
    form = client.get(f"{UI}/signin")
    answer = client.post(f"{UI}/signin", data={"csrf": csrf_of(form.text), "token": admin},
                         headers={"x-forwarded-proto": "https"})  # not trusted: no Secure flag from it
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/_gateway/ui/" in cookie
    assert "Secure" not in cookie.split(",")[0]
    for path in ("/tokens", f"/tokens/{jti_of(admin, gateway)}", "/mint", "/audit", "/explain"):
        assert admin not in client.get(UI + path).text
    # The session is kept in the store under a hash of its id, holding the jti, never the token.
    state = (gateway.config.base_dir / "state.db").read_bytes()
    assert admin.encode() not in state and client.cookies["sg_console"].encode() not in state


def test_secure_cookie_when_configured_for_tls_at_a_proxy(tmp_path: Path, upstream: tuple[RecordingUpstream,
                                                                                          ServerThread],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_TEST_UPSTREAM_TOKEN", "fm2_test")
    running = start_gateway(tmp_path, *upstream, ui={"secure_cookie": "always"})
    try:
        client = client_of(running)
        form = client.get(f"{UI}/signin")
        assert "Secure" in form.headers["set-cookie"]
    finally:
        running.server.stop()


def test_sign_in_refuses_without_csrf_and_names_a_bad_token(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    client = client_of(gateway)
    refused = client.post(f"{UI}/signin", data={"token": admin})
    assert refused.status_code == 403 and "CSRF" in refused.text and "sg_console=" not in refused.headers.get(
        "set-cookie", "")
    form = client.get(f"{UI}/signin")
    bad = client.post(f"{UI}/signin", data={"csrf": csrf_of(form.text), "token": "sgt_nonsense"})
    assert bad.status_code == 401 and "sg_console=" not in bad.headers.get("set-cookie", "")


def test_a_form_without_its_csrf_token_is_refused_and_does_nothing(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    client = sign_in(gateway, admin)
    before = len(gateway.records())
    for data in ({}, {"csrf": "forged"}):
        answer = client.post(f"{UI}/mint", data={**data, "role0": "viewer", "kind0": "env", "pattern0": "staging"})
        assert answer.status_code == 403 and "CSRF token is missing or stale" in answer.text
    assert len(gateway.records()) == before
    target = gateway.mint("viewer@env:staging", name="target")
    answer = client.post(f"{UI}/tokens/{jti_of(target, gateway)}/revoke", data={"reason": "x"})
    assert answer.status_code == 403
    assert all(r.revoked_at is None for r in gateway.records())
    # Without a session at all, a POST is refused too (plain httpx, no cookie).
    assert client_of(gateway).post(f"{UI}/mint", data={"role0": "viewer"}).status_code == 401


def test_sign_out_ends_the_session_everywhere(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    client = sign_in(gateway, admin)
    cookie = client.cookies["sg_console"]
    page = client.get(f"{UI}/tokens")
    assert client.post(f"{UI}/signout", data={"csrf": csrf_of(page.text)}).status_code == 303
    replay = client_of(gateway)
    replay.cookies.set("sg_console", cookie, path="/_gateway/ui/")
    answer = replay.get(f"{UI}/tokens")
    assert answer.status_code == 303 and answer.headers["location"] == f"{UI}/signin"


def test_signing_in_again_ends_the_previous_session(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    client = sign_in(gateway, admin)
    first = client.cookies["sg_console"]
    form = client.get(f"{UI}/signin")
    client.post(f"{UI}/signin", data={"csrf": csrf_of(form.text), "token": admin})
    assert client.cookies["sg_console"] != first
    replay = client_of(gateway)
    replay.cookies.set("sg_console", first, path="/_gateway/ui/")
    assert replay.get(f"{UI}/tokens").status_code == 303


def test_revoking_the_token_ends_its_session(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    client = sign_in(gateway, admin)
    assert client.get(f"{UI}/tokens").status_code == 200
    gateway.revoke(jti_of(admin, gateway))
    deadline = time.monotonic() + 3
    while client.get(f"{UI}/tokens").status_code == 200:
        assert time.monotonic() < deadline, "a revoked token's session still works"
        time.sleep(0.1)


def test_an_idle_session_ends(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_TEST_UPSTREAM_TOKEN", "fm2_test")
    running = start_gateway(tmp_path, *upstream, ui={"session_idle": "1s"})
    try:
        client = sign_in(running, running.mint("token-admin@gateway", name="admin"))
        assert client.get(f"{UI}/tokens").status_code == 200
        time.sleep(2.2)
        assert client.get(f"{UI}/tokens").status_code == 303
    finally:
        running.server.stop()


def test_a_token_without_token_admin_sees_only_its_own_page(gateway: RunningGateway) -> None:
    mine = gateway.mint("deployer@app:web-staging", name="web-ci")
    other = gateway.mint("viewer@env:staging", name="other")
    client = sign_in(gateway, mine)
    home = client.get(f"{UI}/")
    assert home.status_code == 303 and home.headers["location"] == f"{UI}/tokens/{jti_of(mine, gateway)}"
    own = client.get(home.headers["location"])
    assert own.status_code == 200 and "web-ci" in own.text and "machines:deploy" in own.text
    assert 'href="/_gateway/ui/mint"' not in own.text and "Lineage" not in own.text
    assert client.get(f"{UI}/tokens/{jti_of(other, gateway)}").status_code == 403
    for path in ("/tokens", "/mint", "/audit", "/audit/events"):
        answer = client.get(UI + path)
        assert answer.status_code == 403 and "token-admin@gateway" in answer.text
    explained = client.post(f"{UI}/explain", data={"csrf": csrf_of(own.text), "method": "GET",
                                                   "path": "/v1/apps/web-prod/machines",
                                                   "grants": "admin@app:*"})
    assert explained.status_code == 403


def test_console_actions_are_the_admin_apis_and_audited_alike(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    client = sign_in(gateway, admin)
    page = client.get(f"{UI}/mint")
    minted = client.post(f"{UI}/mint", data={"csrf": csrf_of(page.text), "role0": "deployer", "kind0": "app",
                                             "pattern0": "web-staging", "ttl": "2h", "name": XSS})
    assert minted.status_code == 201
    token = re.search(r'id="secret" class="secret">(sgt_[^<]+)<', minted.text)
    assert token is not None
    # The minted token works at the gateway like one from the admin API.
    assert client_of(gateway).get("/v1/apps/web-staging/machines",
                                headers={"authorization": f"Bearer {token.group(1)}"}).status_code == 200
    record = next(r for r in gateway.records() if r.name == XSS)
    assert record.grants == ("deployer@app:web-staging",) and record.exp - record.iat == 7200
    listed = client.get(f"{UI}/tokens", params={"name": "onerror"})
    assert "&lt;img src=x onerror=alert(1)&gt;" in listed.text and XSS not in listed.text
    lines = gateway.audit_records()
    mint_line = next(line for line in lines if line["path"] == f"{UI}/mint" and line["method"] == "POST")
    assert mint_line["action"] == "gateway:mint" and mint_line["decision"] == "allow"
    assert mint_line["reason"] == f"minted {record.jti} (deployer@app:web-staging)"
    assert mint_line["token_name"] == "admin"
    # A grant the policy does not know is refused with the registry's message, nothing minted.
    bad = client.post(f"{UI}/mint", data={"csrf": csrf_of(page.text), "role0": "deployer", "kind0": "env",
                                          "pattern0": "produciton"})
    assert bad.status_code == 400 and "did you mean &#39;production&#39;" in bad.text
    too_long = client.post(f"{UI}/mint", data={"csrf": csrf_of(page.text), "role0": "viewer", "kind0": "env",
                                               "pattern0": "staging", "ttl": "400d"})
    assert too_long.status_code == 400 and "tokens.max_ttl" in too_long.text


def test_revoke_shows_the_cascade_then_revokes_it(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    parent = gateway.mint("deployer@env:staging", name="parent", ttl_s=3600)
    child = httpx.post(f"{gateway.url}/_gateway/v1/token/attenuate", json={
        "grants": ["viewer@app:web-staging"], "ttl": "30m", "name": "child"},
        headers={"authorization": f"Bearer {parent}"}).json()
    client = sign_in(gateway, admin)
    parent_jti = jti_of(parent, gateway)
    confirm = client.get(f"{UI}/tokens/{parent_jti}/revoke")
    assert confirm.status_code == 200 and "these 2 token(s)" in confirm.text and child["jti"] in confirm.text
    done = client.post(f"{UI}/tokens/{parent_jti}/revoke", data={"csrf": csrf_of(confirm.text), "reason": "leak"})
    assert done.status_code == 200 and child["jti"] in done.text
    revoked = {r.jti: r for r in gateway.records()}
    assert revoked[parent_jti].revoked_reason == "leak" and revoked[child["jti"]].revoked_at is not None


def test_rotate_shows_the_successor_once_and_the_lineage(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    old = gateway.mint("deployer@app:web-staging", name="web-ci")
    client = sign_in(gateway, admin)
    old_jti = jti_of(old, gateway)
    page = client.get(f"{UI}/tokens/{old_jti}")
    rotated = client.post(f"{UI}/tokens/{old_jti}/rotate", data={"csrf": csrf_of(page.text), "grace": "5m"})
    assert rotated.status_code == 201 and "sgt_" in rotated.text
    successor = next(r for r in gateway.records() if r.rotated_from == old_jti)
    tree = client.get(f"{UI}/tokens/{successor.jti}").text
    assert 'id="lineage"' in tree and old_jti in tree and "rotated" in tree


def test_the_audit_stream_sends_what_its_filters_select(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    viewer = gateway.mint("viewer@app:web-staging", name="viewer")
    client = sign_in(gateway, admin)
    client_of(gateway).delete("/v1/apps/web-staging/machines/m1", headers={"authorization": f"Bearer {viewer}"})
    gateway.services.audit.flush()
    with client.stream("GET", f"{UI}/audit/events", params={"decision": "deny", "app": "web-staging"}) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        for line in events.iter_lines():
            if line.startswith("data: "):
                assert '"machines:destroy"' in line or '"machines:' in line
                assert '"decision": "deny"' in line and '"allow"' not in line
                break


def test_the_audit_view_says_when_no_sink_can_be_read(tmp_path: Path, upstream: tuple[RecordingUpstream,
                                                                                      ServerThread],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_TEST_UPSTREAM_TOKEN", "fm2_test")
    running = start_gateway(tmp_path, *upstream, audit={"sinks": ["stdout"]})
    try:
        client = sign_in(running, running.mint("token-admin@gateway", name="admin"))
        page = client.get(f"{UI}/audit")
        assert page.status_code == 200 and "add file:PATH" in page.text
        assert client.get(f"{UI}/audit/events").status_code == 409
    finally:
        running.server.stop()


def test_the_console_can_be_switched_off(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_TEST_UPSTREAM_TOKEN", "fm2_test")
    running = start_gateway(tmp_path, *upstream, ui={"enabled": False})
    try:
        answer = client_of(running).get(f"{UI}/signin")
        assert answer.status_code == 404 and answer.json()["error"] == "not_found"
    finally:
        running.server.stop()


def record(jti: str, *, iat: int = 1000, exp: int = 10**10, name: str = "t",
           grants: tuple[str, ...] = ("viewer@env:staging",), parent: str | None = None,
           rotated_from: str | None = None, revoked_at: int | None = None,
           last_used_at: int | None = None) -> TokenRecord:
    return TokenRecord(jti=jti, sub="s", name=name, grants=grants, iat=iat, exp=exp, parent=parent,
                       root=None if parent is None else "root", rotated_from=rotated_from, revoked_at=revoked_at,
                       last_used_at=last_used_at)


def test_list_filters_and_pages() -> None:
    now = 5000
    records = [record(f"j{i}", iat=10_000 - i, name=f"web-{i % 3}", exp=now + (1 if i % 5 else -1),
                      revoked_at=1 if i % 7 == 0 else None, last_used_at=None if i % 2 else now - 10 * 86400)
               for i in range(1000)]
    page = filter_page(records, ListQuery(state="active", name="WEB-1"), now)
    expected = [r for r in records if r.revoked_at is None and r.exp > now and "web-1" in r.name]
    assert page.total == len(expected) and page.rows == expected[:50]
    assert filter_page(records, ListQuery(state="revoked", page=2), now).rows == [
        r for r in records if r.revoked_at is not None][50:100]
    assert filter_page(records, ListQuery(unused="never"), now).total == 500
    assert filter_page(records, ListQuery(unused="30d"), now).total == 500
    assert filter_page(records, ListQuery(unused="7d"), now).total == 1000
    assert filter_page(records, ListQuery(grant="viewer@env"), now).total == 1000
    last = filter_page(records, ListQuery(page=999), now)
    assert last.page == last.pages == 20 and len(last.rows) == 50
    assert ListQuery.parse({"state": "bogus", "page": "x", "unused": "?"}) == ListQuery()


def test_lineage_tree_and_cascade() -> None:
    known = {r.jti: r for r in (
        record("root", iat=1), record("child", iat=2, parent="root"), record("grand", iat=3, parent="child"),
        record("succ", iat=4, parent="root", rotated_from="child"), record("other", iat=5))}
    tree = lineage(known["grand"], known)
    assert tree.record.jti == "root"
    assert [(n.record.jti, n.how) for n in tree.children] == [("child", "attenuated")]
    assert sorted((n.record.jti, n.how) for n in tree.children[0].children) == [("grand", "attenuated"),
                                                                               ("succ", "rotated")]
    assert [r.jti for r in cascade("child", known)] == ["child", "grand"]
    assert [r.jti for r in cascade("root", known)] == ["root", "child", "succ", "grand"]


def test_stopping_the_server_ends_an_open_audit_stream(tmp_path: Path, upstream: tuple[RecordingUpstream,
                                                                                      ServerThread],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A graceful stop waits for responses in flight; the live view never ends by itself, so the
    # server cuts it (gateway/server.py, ENDLESS) instead of waiting for the browser to leave.
    monkeypatch.setenv("SG_TEST_UPSTREAM_TOKEN", "fm2_test")
    running = start_gateway(tmp_path, *upstream)
    client = sign_in(running, running.mint("token-admin@gateway", name="admin"))
    ended = threading.Event()

    def watch() -> None:
        with contextlib.suppress(httpx.HTTPError), client.stream("GET", f"{UI}/audit/events") as events:
            for _ in events.iter_lines():
                pass
        ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.5)
    started = time.monotonic()
    running.server.stop()
    assert time.monotonic() - started < 3 and not running.server.thread.is_alive()
    assert ended.wait(3)
