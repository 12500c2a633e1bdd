"""The admin API under `/_gateway/v1/` (DESIGN section 8, issue 3), through a real gateway.

Every test talks HTTP to a uvicorn-served gateway in front of a recording upstream: minting,
listing, showing and revoking tokens as a `token-admin@gateway`, body validation (400 naming the
field), refusals that mint nothing, rotation with a grace period, attenuation (narrower works,
wider is refused), the revocation cascade, explain, the OpenAPI document, audit and JWKS.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_30
from starlette.routing import Route

from gateway.api.app import create_api_app
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.servers import RecordingUpstream, ServerThread

V1 = "/_gateway/v1"
RECORD_FIELDS = {"jti", "sub", "name", "grants", "iat", "exp", "parent", "revoked_at", "last_used_at"}
STAGING_MACHINES = "/v1/apps/web-staging/machines"
TOKEN_RE = re.compile(r"sgt_[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def settle(response: httpx.Response) -> httpx.Response:
    """After a 5xx, give the server thread time to finish logging its traceback before this thread
    formats an assertion failure: CPython 3.11's ast.parse (used by both) is not thread-safe."""
    if response.status_code >= 500:
        time.sleep(0.5)
    return response


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def payload(token: str) -> dict[str, Any]:
    part = token.removeprefix("sgt_").split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def header(token: str) -> dict[str, Any]:
    part = token.removeprefix("sgt_").split(".")[0]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def jti_of(token: str) -> str:
    return str(payload(token)["jti"])


def records(client: httpx.Client, admin: str) -> list[dict[str, Any]]:
    response = client.get(f"{V1}/tokens", headers=bearer(admin))
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()["tokens"]
    return listed


def snapshot(client: httpx.Client, admin: str) -> list[dict[str, Any]]:
    """The records minus `last_used_at` (which moves whenever a token is used): what a refusal must not change."""
    return sorted(({k: v for k, v in r.items() if k != "last_used_at"} for r in records(client, admin)),
                  key=lambda r: str(r["jti"]))


def mint(client: httpx.Client, admin: str, *grants: str, **extra: Any) -> dict[str, Any]:
    response = client.post(f"{V1}/tokens", headers=bearer(admin), json={"grants": list(grants), **extra})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def attenuate(client: httpx.Client, parent: str, *grants: str, **extra: Any) -> httpx.Response:
    return client.post(f"{V1}/token/attenuate", headers=bearer(parent), json={"grants": list(grants), **extra})


def status_of(client: httpx.Client, token: str, method: str = "GET", path: str = STAGING_MACHINES) -> int:
    return client.request(method, path, headers=bearer(token)).status_code


def wait_for_status(client: httpx.Client, token: str, want: int, *, within: float,
                    method: str = "GET", path: str = STAGING_MACHINES) -> float:
    """Poll through the proxy until `token` gets `want`; return how long that took."""
    started = time.monotonic()
    seen: list[int] = []
    while True:
        seen.append(status_of(client, token, method, path))
        elapsed = time.monotonic() - started
        if seen[-1] == want:
            return elapsed
        if elapsed > within:
            raise AssertionError(f"still {seen[-1]} after {within} s (wanted {want}); saw {seen}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """One gateway for the module (tests compare before/after instead of counting from zero)."""
    upstream = RecordingUpstream()
    upstream_server = ServerThread(upstream).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
        running = start_gateway(tmp_path_factory.mktemp("admin-api"), upstream, upstream_server)
    yield running
    running.server.stop()
    upstream_server.stop()


@pytest.fixture(scope="module")
def admin(gateway: RunningGateway) -> str:
    return gateway.mint("token-admin@gateway", name="admin", subject="test:admin")


@pytest.fixture(autouse=True)
def _fresh_upstream(gateway: RunningGateway) -> None:
    gateway.upstream.clear()


@pytest.fixture
def client(gateway: RunningGateway) -> Iterator[httpx.Client]:
    with gateway.client() as http:
        yield http


# --- mint, list, show, revoke --------------------------------------------------------------------

def test_mint_returns_201_with_the_token_and_its_record(gateway: RunningGateway, client: httpx.Client,
                                                        admin: str) -> None:
    before = time.time()
    response = client.post(f"{V1}/tokens", headers=bearer(admin), json={
        "grants": ["deployer@app:web-staging"], "ttl": "1h", "name": "web-ci", "subject": "ci:github:acme/web"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert {"token", "jti", "exp", "grants", "sub", "name"} <= set(body)
    assert body["token"].startswith("sgt_")
    claims = payload(body["token"])
    assert body["jti"] == claims["jti"]
    assert body["grants"] == claims["grants"] == ["deployer@app:web-staging"]
    assert body["sub"] == claims["sub"] == "ci:github:acme/web"
    assert body["name"] == claims["name"] == "web-ci"
    assert body["exp"] == claims["exp"] == body["iat"] + 3600
    assert before - 1 <= body["iat"] <= time.time() + 1
    assert body["parent"] is None and body["revoked_at"] is None

    # The minted token is live at once, for what its grant covers and nothing else.
    assert status_of(client, body["token"]) == 200
    assert status_of(client, body["token"], path="/v1/apps/web-prod/machines") == 403
    assert [r.raw_path for r in gateway.upstream.received] == [STAGING_MACHINES.encode()]
    assert gateway.upstream.received[0].header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]


def test_mint_defaults_name_subject_and_ttl(gateway: RunningGateway, client: httpx.Client, admin: str) -> None:
    body = mint(client, admin, "viewer@app:web")
    assert body["name"] == "api-token"
    assert body["sub"] == "api:test:admin"
    assert body["exp"] - body["iat"] == gateway.config.tokens_default_ttl_s


def test_list_shows_records_and_never_token_strings(client: httpx.Client, admin: str) -> None:
    first = mint(client, admin, "viewer@app:web", name="one")
    second = mint(client, admin, "deployer@env:staging", name="two")
    response = client.get(f"{V1}/tokens", headers=bearer(admin))
    assert response.status_code == 200
    assert "sgt_" not in response.text
    for token in (admin, first["token"], second["token"]):
        assert token not in response.text
        assert token.split(".")[2] not in response.text  # not even the signature
    listed = {r["jti"]: r for r in response.json()["tokens"]}
    assert {jti_of(admin), first["jti"], second["jti"]} <= set(listed)
    for record in listed.values():
        assert set(record) >= RECORD_FIELDS
        assert "token" not in record
    assert listed[second["jti"]]["grants"] == ["deployer@env:staging"]
    assert listed[first["jti"]]["name"] == "one"

    # ?active=true leaves out revoked tokens.
    assert client.delete(f"{V1}/tokens/{first['jti']}", headers=bearer(admin)).status_code == 204
    active = {r["jti"] for r in client.get(f"{V1}/tokens", params={"active": "true"},
                                           headers=bearer(admin)).json()["tokens"]}
    assert {jti_of(admin), second["jti"]} <= active
    assert first["jti"] not in active
    assert first["jti"] in {r["jti"] for r in records(client, admin)}


def test_show_returns_the_record(client: httpx.Client, admin: str) -> None:
    minted = mint(client, admin, "operator@app:api-*", name="ops", ttl="2h")
    response = client.get(f"{V1}/tokens/{minted['jti']}", headers=bearer(admin))
    assert response.status_code == 200
    shown = response.json()
    assert "token" not in shown and "sgt_" not in response.text
    assert shown["jti"] == minted["jti"] and shown["grants"] == ["operator@app:api-*"]
    assert shown["name"] == "ops" and shown["exp"] == minted["exp"] and shown["iat"] == minted["iat"]
    assert shown["revoked_at"] is None and shown["parent"] is None


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("DELETE", ""), ("POST", "/rotate")])
def test_unknown_jti_is_404(client: httpx.Client, admin: str, method: str, suffix: str) -> None:
    before = snapshot(client, admin)
    response = client.request(method, f"{V1}/tokens/no-such-jti-0000{suffix}", headers=bearer(admin))
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "not_found"
    assert "no-such-jti-0000" in response.json()["message"]
    assert snapshot(client, admin) == before


def test_revoke_is_204_and_the_token_gets_401_within_a_second(client: httpx.Client, admin: str) -> None:
    minted = mint(client, admin, "deployer@app:web-staging")
    token = minted["token"]
    assert status_of(client, token) == 200
    response = client.delete(f"{V1}/tokens/{minted['jti']}", params={"reason": "leaked in a log"},
                             headers=bearer(admin))
    assert response.status_code == 204
    assert response.content == b""
    wait_for_status(client, token, 401, within=1.0)
    denied = client.get(STAGING_MACHINES, headers=bearer(token))
    assert denied.json()["error"] == "unauthenticated"
    assert "invalid_token" in denied.headers["www-authenticate"]
    shown = client.get(f"{V1}/tokens/{minted['jti']}", headers=bearer(admin)).json()
    assert shown["revoked_at"] is not None
    assert shown["revoked_reason"] == "leaked in a log"
    # Revoking again is harmless; the admin token itself is untouched.
    assert client.delete(f"{V1}/tokens/{minted['jti']}", headers=bearer(admin)).status_code == 204
    assert client.get(f"{V1}/tokens", headers=bearer(admin)).status_code == 200


# --- validation ----------------------------------------------------------------------------------

GOOD = ["viewer@app:web"]


@pytest.mark.parametrize(("body", "named"), [
    pytest.param({}, "grants", id="missing-grants"),
    pytest.param({"grants": None}, "grants", id="null-grants"),
    pytest.param({"grants": "viewer@app:web"}, "grants", id="grants-not-a-list"),
    pytest.param({"grants": []}, "grants", id="grants-empty"),
    pytest.param({"grants": [7]}, "grants", id="grant-not-a-string"),
    pytest.param({"grants": ["viewer-app-web"]}, "viewer-app-web", id="bad-grant-string"),
    pytest.param({"grants": ["viewer@planet:mars"]}, "planet", id="bad-scope"),
    pytest.param({"grants": ["wizard@app:web"]}, "wizard", id="unknown-role"),
    pytest.param({"grants": ["token-admin@app:web"]}, "token-admin", id="token-admin-off-gateway"),
    pytest.param({"grants": ["viewer@gateway"]}, "gateway", id="gateway-scope-for-viewer"),
    pytest.param({"grants": GOOD, "ttl": "91d"}, "max_ttl", id="ttl-over-max"),
    pytest.param({"grants": GOOD, "ttl": "soon"}, "ttl", id="ttl-not-a-duration"),
    pytest.param({"grants": GOOD, "ttl": "0s"}, "ttl", id="ttl-zero"),
    pytest.param({"grants": GOOD, "ttl": 1.5}, "ttl", id="ttl-float"),
    pytest.param({"grants": GOOD, "ttl": True}, "ttl", id="ttl-bool"),
    pytest.param({"grants": GOOD, "name": 5}, "name", id="name-not-a-string"),
    pytest.param({"grants": GOOD, "name": "x" * 129}, "name", id="name-too-long"),
    pytest.param({"grants": GOOD, "subject": ["a"]}, "subject", id="subject-not-a-string"),
    pytest.param({"grants": GOOD, "colour": "red"}, "colour", id="unknown-field"),
])
def test_mint_bodies_are_validated_with_400_naming_the_field(client: httpx.Client, admin: str,
                                                             body: dict[str, Any], named: str) -> None:
    before = snapshot(client, admin)
    response = client.post(f"{V1}/tokens", headers=bearer(admin), json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error"] == "bad_request"
    assert named in error["message"]
    assert error["request_id"]
    assert snapshot(client, admin) == before


@pytest.mark.parametrize(("raw", "named"), [
    pytest.param(b"{grants: nope", "JSON", id="not-json"),
    pytest.param(b'["viewer@app:web"]', "object", id="json-array"),
    pytest.param(b'"viewer@app:web"', "object", id="json-string"),
    pytest.param(b"null", "object", id="json-null"),
    pytest.param(b"\xff\xfe", "JSON", id="not-utf8"),
])
def test_malformed_bodies_are_400(client: httpx.Client, admin: str, raw: bytes, named: str) -> None:
    before = snapshot(client, admin)
    response = client.post(f"{V1}/tokens", headers={**bearer(admin), "content-type": "application/json"},
                           content=raw)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert named in response.json()["message"]
    assert snapshot(client, admin) == before


@pytest.mark.parametrize(("body", "named"), [
    pytest.param({"grace": "forever"}, "grace", id="grace-not-a-duration"),
    pytest.param({"grace": [1]}, "grace", id="grace-wrong-type"),
    pytest.param({"grace": "1h", "why": "x"}, "why", id="unknown-field"),
])
def test_rotate_bodies_are_validated(client: httpx.Client, admin: str, body: dict[str, Any], named: str) -> None:
    minted = mint(client, admin, "viewer@app:web")
    before = snapshot(client, admin)
    response = client.post(f"{V1}/tokens/{minted['jti']}/rotate", headers=bearer(admin), json=body)
    assert response.status_code == 400, response.text
    assert named in response.json()["message"]
    assert snapshot(client, admin) == before
    assert status_of(client, minted["token"], path="/v1/apps/web") == 200


@pytest.mark.parametrize("body", [
    pytest.param(b'{"grants": ["viewer@app:web"], "name": "\\ud800"}', id="name"),
    pytest.param(b'{"grants": ["viewer@app:web"], "subject": "ci:\\udfff"}', id="subject"),
])
def test_mint_with_a_lone_surrogate_is_a_400_not_a_server_error(client: httpx.Client, admin: str,
                                                                 body: bytes) -> None:
    before = snapshot(client, admin)
    # "\ud800" is valid JSON but no valid Unicode text: it cannot be stored or echoed as UTF-8.
    response = settle(client.post(f"{V1}/tokens", headers={**bearer(admin), "content-type": "application/json"},
                                  content=body))
    assert response.status_code == 400, f"{response.status_code} {response.text}"
    assert response.json()["error"] == "bad_request"
    assert snapshot(client, admin) == before


def test_explain_with_a_lone_surrogate_in_the_path_is_not_a_server_error(client: httpx.Client, admin: str) -> None:
    response = settle(client.post(f"{V1}/explain", headers={**bearer(admin), "content-type": "application/json"},
                                  content=b'{"method": "GET", "path": "/v1/apps/web\\ud800/machines"}'))
    assert response.status_code < 500, f"{response.status_code} {response.text}"
    result = response.json()
    # Either refused as a bad request, or explained as a denied (ambiguous) path.
    assert result.get("error") == "bad_request" and result.get("allowed") is not True


# --- refusals ------------------------------------------------------------------------------------

def test_non_admin_tokens_get_403_and_nothing_happens(gateway: RunningGateway, client: httpx.Client,
                                                      admin: str) -> None:
    victim = mint(client, admin, "viewer@app:web")
    callers = {grant: gateway.mint(grant, name=f"not-admin-{grant}")
               for grant in ("admin@app:*", "deployer@env:staging", "viewer@app:web")}
    before = snapshot(client, admin)
    for grant, token in callers.items():
        calls = [
            ("POST", f"{V1}/tokens", {"grants": ["admin@app:*"]}),
            ("GET", f"{V1}/tokens", None),
            ("GET", f"{V1}/tokens/{victim['jti']}", None),
            ("DELETE", f"{V1}/tokens/{victim['jti']}", None),
            ("POST", f"{V1}/tokens/{victim['jti']}/rotate", {"grace": "0s"}),
        ]
        for method, path, body in calls:
            response = client.request(method, path, headers=bearer(token), json=body)
            assert response.status_code == 403, f"{grant} {method} {path}: {response.status_code}"
            assert response.json()["error"] == "forbidden"
            assert "sgt_" not in response.text
    assert snapshot(client, admin) == before  # nothing minted, revoked or cut short
    assert status_of(client, victim["token"], path="/v1/apps/web") == 200


@pytest.mark.parametrize("authorization", [
    None, "Bearer", "Bearer sgt_forged.forged.forged", "Basic dXNlcjpwYXNz", "Bearer not-even-prefixed",
])
def test_missing_or_bad_token_gets_401(client: httpx.Client, admin: str, authorization: str | None) -> None:
    before = snapshot(client, admin)
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", f"{V1}/tokens"), ("GET", f"{V1}/tokens"), ("GET", f"{V1}/tokens/x"),
                         ("DELETE", f"{V1}/tokens/x"), ("POST", f"{V1}/tokens/x/rotate"),
                         ("POST", f"{V1}/token/attenuate"), ("POST", f"{V1}/explain")):
        response = client.request(method, path, headers=headers, json={"grants": ["admin@app:*"]})
        assert response.status_code == 401, f"{method} {path}: {response.status_code}"
        assert response.json()["error"] == "unauthenticated"
        assert "invalid_token" in response.headers["www-authenticate"]
    assert snapshot(client, admin) == before


def test_a_token_in_the_query_string_is_refused(client: httpx.Client, admin: str) -> None:
    response = client.get(f"{V1}/tokens", params={"access_token": admin})
    assert response.status_code in (400, 401)
    response = client.get(f"{V1}/tokens", params={"t": admin}, headers=bearer(admin))
    assert response.status_code in (400, 401)
    assert admin.removeprefix("sgt_") not in response.text


def test_a_revoked_admin_token_can_do_nothing(client: httpx.Client, admin: str) -> None:
    second = mint(client, admin, "token-admin@gateway", name="second-admin")
    assert client.delete(f"{V1}/tokens/{second['jti']}", headers=bearer(admin)).status_code == 204
    before = snapshot(client, admin)
    response = client.post(f"{V1}/tokens", headers=bearer(second["token"]), json={"grants": ["admin@app:*"]})
    assert response.status_code == 401
    assert snapshot(client, admin) == before


# --- rotation ------------------------------------------------------------------------------------

def test_rotation_keeps_the_old_token_during_grace_then_401(client: httpx.Client, admin: str) -> None:
    old = mint(client, admin, "deployer@app:web-staging", name="deploy", subject="ci:web", ttl="2h")
    response = client.post(f"{V1}/tokens/{old['jti']}/rotate", headers=bearer(admin), json={"grace": "2s"})
    rotated_at = time.monotonic()
    assert response.status_code == 201, response.text
    new = response.json()
    assert new["token"] != old["token"] and new["jti"] != old["jti"]
    assert new["grants"] == old["grants"] and new["name"] == "deploy" and new["sub"] == "ci:web"
    assert new["rotated_from"] == old["jti"] and new["parent"] is None  # a successor, not a child
    assert new["exp"] - new["iat"] == 7200
    assert status_of(client, new["token"]) == 200
    assert status_of(client, old["token"]) == 200  # within the grace period
    wait_for_status(client, old["token"], 401, within=4.0)
    # exp is cut to (whole second of rotation) + 2 s: the old token lived for 1 to 2 s more.
    lived = time.monotonic() - rotated_at
    assert 0.9 <= lived <= 4.0, f"the old token died {lived:.2f} s after a rotation with 2 s of grace"
    assert status_of(client, new["token"]) == 200
    assert status_of(client, new["token"], "POST") == 200
    shown = client.get(f"{V1}/tokens/{old['jti']}", headers=bearer(admin)).json()
    assert shown["exp"] <= int(time.time())


def test_rotation_with_zero_grace_kills_the_old_token_at_once(client: httpx.Client, admin: str) -> None:
    old = mint(client, admin, "deployer@app:web-staging")
    assert status_of(client, old["token"]) == 200
    response = client.post(f"{V1}/tokens/{old['jti']}/rotate", headers=bearer(admin), json={"grace": "0s"})
    assert response.status_code == 201
    assert status_of(client, old["token"]) == 401
    assert status_of(client, response.json()["token"]) == 200


def test_rotation_without_a_body_keeps_the_old_token_for_an_hour(client: httpx.Client, admin: str) -> None:
    old = mint(client, admin, "viewer@app:web")
    response = client.post(f"{V1}/tokens/{old['jti']}/rotate", headers=bearer(admin))
    assert response.status_code == 201, response.text
    assert status_of(client, old["token"], path="/v1/apps/web") == 200
    shown = client.get(f"{V1}/tokens/{old['jti']}", headers=bearer(admin)).json()
    assert 3590 <= shown["exp"] - time.time() <= 3601


def test_a_revoked_or_rotated_away_token_cannot_be_rotated(client: httpx.Client, admin: str) -> None:
    old = mint(client, admin, "viewer@app:web")
    assert client.delete(f"{V1}/tokens/{old['jti']}", headers=bearer(admin)).status_code == 204
    before = snapshot(client, admin)
    response = client.post(f"{V1}/tokens/{old['jti']}/rotate", headers=bearer(admin), json={"grace": "1h"})
    assert response.status_code == 422
    assert "revoked" in response.json()["message"]
    assert snapshot(client, admin) == before


# --- attenuation ---------------------------------------------------------------------------------

def test_attenuation_narrows_the_callers_own_token(gateway: RunningGateway, client: httpx.Client,
                                                   admin: str) -> None:
    parent = gateway.mint("deployer@app:*", "viewer@app:api", ttl_s=3600, name="wide")
    parent_claims = payload(parent)
    assert status_of(client, parent, "POST", "/v1/apps/web-prod/machines") == 200
    response = attenuate(client, parent, "deployer@app:web-staging", ttl="10m", name="narrow")
    assert response.status_code == 201, response.text
    child = response.json()
    assert child["grants"] == ["deployer@app:web-staging"]
    assert child["parent"] == parent_claims["jti"]
    assert child["name"] == "narrow" and child["sub"] == parent_claims["sub"]
    assert child["exp"] - child["iat"] == 600
    assert child["exp"] <= parent_claims["exp"]
    token = child["token"]
    # Narrower: allowed inside, denied where the parent was allowed.
    assert status_of(client, token, "POST", STAGING_MACHINES) == 200
    assert status_of(client, token, "POST", "/v1/apps/web-prod/machines") == 403
    assert status_of(client, token, "GET", "/v1/apps/api") == 403
    assert status_of(client, parent, "GET", "/v1/apps/api") == 200

    # Dropping a grant is narrowing too; no ttl: the child ends with its parent at the latest.
    response = attenuate(client, parent, "viewer@app:api")
    assert response.status_code == 201, response.text
    only_api = response.json()
    assert only_api["exp"] <= parent_claims["exp"]
    assert status_of(client, only_api["token"], "GET", "/v1/apps/api") == 200
    assert status_of(client, only_api["token"], "GET", STAGING_MACHINES) == 403
    # A child may narrow itself again (it is a token like any other).
    response = attenuate(client, child["token"], "deployer@app:web-staging", ttl="5m")
    assert response.status_code == 201
    assert response.json()["parent"] == child["jti"]


@pytest.mark.parametrize(("grants", "ttl", "named"), [
    pytest.param(["admin@app:web-staging"], None, "admin@app:web-staging", id="another-role"),
    pytest.param(["deployer@app:web-prod"], None, "deployer@app:web-prod", id="another-app"),
    pytest.param(["deployer@app:web-*"], None, "deployer@app:web-*", id="wider-glob"),
    pytest.param(["deployer@app:*"], None, "deployer@app:*", id="every-app"),
    pytest.param(["deployer@env:staging"], None, "deployer@env:staging", id="app-to-env"),
    pytest.param(["deployer@app:web-staging", "viewer@app:api"], None, "viewer@app:api", id="one-extra-grant"),
    pytest.param(["token-admin@gateway"], None, "token-admin@gateway", id="token-admin"),
    pytest.param(["deployer@app:web-staging"], "2h", "outlive", id="longer-ttl-than-parent"),
])
def test_attenuation_refuses_anything_wider_and_mints_nothing(gateway: RunningGateway, client: httpx.Client,
                                                              admin: str, grants: list[str], ttl: str | None,
                                                              named: str) -> None:
    parent = gateway.mint("deployer@app:web-staging", ttl_s=3600, name="parent")
    before = snapshot(client, admin)
    response = attenuate(client, parent, *grants, **({"ttl": ttl} if ttl else {}))
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "forbidden"
    assert named in response.json()["message"]
    assert "sgt_" not in response.text
    assert snapshot(client, admin) == before


@pytest.mark.parametrize(("body", "named"), [
    pytest.param({}, "grants", id="missing-grants"),
    pytest.param({"grants": "deployer@app:web-staging"}, "grants", id="grants-not-a-list"),
    pytest.param({"grants": ["nonsense"]}, "nonsense", id="bad-grant"),
    pytest.param({"grants": ["deployer@app:web-staging"], "ttl": "whenever"}, "ttl", id="bad-ttl"),
    pytest.param({"grants": ["deployer@app:web-staging"], "parent": "x"}, "parent", id="unknown-field"),
])
def test_attenuation_bodies_are_validated(gateway: RunningGateway, client: httpx.Client, admin: str,
                                          body: dict[str, Any], named: str) -> None:
    parent = gateway.mint("deployer@app:web-staging")
    before = snapshot(client, admin)
    response = client.post(f"{V1}/token/attenuate", headers=bearer(parent), json=body)
    assert response.status_code == 400, response.text
    assert named in response.json()["message"]
    assert snapshot(client, admin) == before


def test_env_scoped_parent_narrows_to_an_app_of_that_environment(gateway: RunningGateway, client: httpx.Client,
                                                                 admin: str) -> None:
    parent = gateway.mint("deployer@env:staging", name="staging-deployer")
    allowed = attenuate(client, parent, "deployer@app:web-staging", ttl="10m")
    assert allowed.status_code == 201, allowed.text
    child = allowed.json()["token"]
    assert status_of(client, child, "POST", STAGING_MACHINES) == 200
    assert status_of(client, child, "POST", "/v1/apps/api-staging/machines") == 403
    assert status_of(client, parent, "POST", "/v1/apps/api-staging/machines") == 200
    before = snapshot(client, admin)
    refused = attenuate(client, parent, "deployer@app:web-prod", ttl="10m")
    assert refused.status_code == 403, refused.text
    assert "deployer@app:web-prod" in refused.json()["message"]
    # A glob could reach other environments: refused as well.
    assert attenuate(client, parent, "deployer@app:web-*", ttl="10m").status_code == 403
    assert snapshot(client, admin) == before


def test_a_revoked_token_cannot_attenuate(gateway: RunningGateway, client: httpx.Client, admin: str) -> None:
    parent = gateway.mint("deployer@app:web-staging")
    assert client.delete(f"{V1}/tokens/{jti_of(parent)}", headers=bearer(admin)).status_code == 204
    before = snapshot(client, admin)
    response = attenuate(client, parent, "deployer@app:web-staging", ttl="1m")
    assert response.status_code == 401
    assert snapshot(client, admin) == before


# --- cascade -------------------------------------------------------------------------------------

def test_revoking_a_parent_revokes_attenuated_descendants_but_not_its_rotation_successor(
        client: httpx.Client, admin: str) -> None:
    # Issue 16 item 8: "rotate because it leaked, then revoke the leaked one" keeps the new one.
    parent = mint(client, admin, "deployer@app:*", name="parent")
    rotated = client.post(f"{V1}/tokens/{parent['jti']}/rotate", headers=bearer(admin), json={"grace": "1h"})
    assert rotated.status_code == 201
    assert rotated.json()["rotated_from"] == parent["jti"] and rotated.json()["parent"] is None
    child = attenuate(client, parent["token"], "deployer@app:web-staging", ttl="30m")
    assert child.status_code == 201, child.text
    grandchild = attenuate(client, child.json()["token"], "deployer@app:web-staging", ttl="10m")
    assert grandchild.status_code == 201, grandchild.text
    of_rotated = attenuate(client, rotated.json()["token"], "deployer@app:web-staging", ttl="10m")
    assert of_rotated.status_code == 201, of_rotated.text
    family = {"parent": parent["token"], "attenuated": child.json()["token"], "grandchild": grandchild.json()["token"]}
    successors = {"rotated": rotated.json()["token"], "child-of-rotated": of_rotated.json()["token"]}
    bystander = mint(client, admin, "deployer@app:web-staging", name="bystander")
    for name, token in {**family, **successors}.items():
        assert status_of(client, token) == 200, name

    assert client.delete(f"{V1}/tokens/{parent['jti']}", headers=bearer(admin)).status_code == 204
    for name, token in family.items():
        wait_for_status(client, token, 401, within=1.0)
        shown = client.get(f"{V1}/tokens/{jti_of(token)}", headers=bearer(admin)).json()
        assert shown["revoked_at"] is not None, name
    for name, token in successors.items():
        assert status_of(client, token) == 200, name
    assert status_of(client, bystander["token"]) == 200
    # Revoking the successor still ends what was attenuated from it.
    assert client.delete(f"{V1}/tokens/{rotated.json()['jti']}", headers=bearer(admin)).status_code == 204
    wait_for_status(client, of_rotated.json()["token"], 401, within=1.0)


def test_revoking_a_child_leaves_the_parent_alone(gateway: RunningGateway, client: httpx.Client,
                                                  admin: str) -> None:
    parent = gateway.mint("deployer@app:web-staging")
    child = attenuate(client, parent, "deployer@app:web-staging", ttl="10m").json()
    assert client.delete(f"{V1}/tokens/{child['jti']}", headers=bearer(admin)).status_code == 204
    wait_for_status(client, child["token"], 401, within=1.0)
    assert status_of(client, parent) == 200


# --- explain -------------------------------------------------------------------------------------

def explain(client: httpx.Client, caller: str, **body: Any) -> httpx.Response:
    return client.post(f"{V1}/explain", headers=bearer(caller), json=body)


def test_a_token_explains_itself(gateway: RunningGateway, client: httpx.Client) -> None:
    token = gateway.mint("deployer@app:web-prod", name="prod-deployer")
    denied = explain(client, token, method="POST", path="/v1/apps/web-prod/secrets")
    assert denied.status_code == 200, denied.text
    result = denied.json()
    assert result["allowed"] is False and result["status"] == 403
    assert result["action"] == "secrets:write"
    assert result["app"] == "web-prod" and result["env"] == "production"
    assert result["rule"] == ["deployer", "*", "production", "secrets:write", "deny"]
    assert "secrets:write" in result["reason"]
    assert "deployer, *, production, secrets:write, deny" in result["reason"]
    assert result["grant"] is None

    allowed = explain(client, token, method="post", path="/v1/apps/web-prod/machines")
    result = allowed.json()
    assert result["allowed"] is True and result["status"] == 200
    assert result["action"] == "machines:deploy" and result["grant"] == "deployer@app:web-prod"
    assert result["rule"][-1] == "allow" and result["rule"][0] == "deployer"
    assert result["method"] == "POST"

    uncovered = explain(client, token, method="GET", path="/v1/apps/web-staging/machines").json()
    assert uncovered["allowed"] is False and "no grant that covers app web-staging" in uncovered["reason"]
    unknown = explain(client, token, method="GET", path="/v2/nothing").json()
    assert unknown["allowed"] is False and unknown["error"] == "unknown_route"
    # A dry run: nothing went upstream.
    assert gateway.upstream.received == []


def test_explain_of_a_body_route(gateway: RunningGateway, client: httpx.Client) -> None:
    token = gateway.mint("deployer@app:web-pr-*")
    inside = explain(client, token, method="POST", path="/v1/apps", body={"name": "web-pr-7"}).json()
    assert inside["allowed"] is True and inside["app"] == "web-pr-7" and inside["action"] == "apps:create"
    outside = explain(client, token, method="POST", path="/v1/apps", body={"name": "api"}).json()
    assert outside["allowed"] is False


def test_token_admin_explains_grants_and_other_tokens(gateway: RunningGateway, client: httpx.Client,
                                                      admin: str) -> None:
    response = explain(client, admin, grants=["viewer@app:web"], method="GET", path="/v1/apps/web/machines")
    assert response.status_code == 200, response.text
    assert response.json()["allowed"] is True and response.json()["grant"] == "viewer@app:web"
    response = explain(client, admin, grants=["viewer@app:web"], method="DELETE", path="/v1/apps/web")
    assert response.json()["allowed"] is False and response.json()["action"] == "apps:delete"

    other = gateway.mint("operator@env:staging", name="ops")
    response = explain(client, admin, token=other, method="POST", path="/v1/apps/web-staging/machines/m1/stop")
    assert response.status_code == 200
    assert response.json()["allowed"] is True and response.json()["grant"] == "operator@env:staging"
    response = explain(client, admin, token=other, method="POST", path="/v1/apps/web-prod/machines/m1/stop")
    assert response.json()["allowed"] is False
    assert "sgt_" not in response.text

    bad = explain(client, admin, grants=["not a grant"], method="GET", path="/v1/apps/web")
    assert bad.status_code == 400 and "not a grant" in bad.json()["message"]
    assert gateway.upstream.received == []


def test_explaining_a_malformed_token_is_a_422_not_a_401_for_the_caller(client: httpx.Client, admin: str) -> None:
    # The caller's own credentials are fine: a bad token in the body is unusable input, named as such
    # (422, so the CLI's exit code says "failed", as in local mode). A 401 (with WWW-Authenticate:
    # invalid_token) would tell the client its own token was refused.
    response = explain(client, admin, token="sgt_garbage", method="GET", path="/v1/apps/web")
    assert response.status_code == 422, f"{response.status_code} {response.text}"
    assert "token" in response.json()["message"]
    assert "www-authenticate" not in response.headers


@pytest.mark.parametrize("body", [
    {"grants": ["admin@env:production"], "method": "DELETE", "path": "/v1/apps/web-prod"},
    {"token": "sgt_whatever", "method": "GET", "path": "/v1/apps/web"},
])
def test_non_admins_cannot_explain_for_others(gateway: RunningGateway, client: httpx.Client,
                                              body: dict[str, Any]) -> None:
    token = gateway.mint("admin@app:*", name="app-admin")
    response = explain(client, token, **body)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "forbidden"


@pytest.mark.parametrize(("body", "named"), [
    pytest.param({"path": "/v1/apps/web"}, "method", id="missing-method"),
    pytest.param({"method": "GET"}, "path", id="missing-path"),
    pytest.param({"method": 1, "path": "/v1/apps/web"}, "method", id="method-not-a-string"),
    pytest.param({"method": "GET", "path": "/v1/apps/web", "verbose": True}, "verbose", id="unknown-field"),
])
def test_explain_bodies_are_validated(gateway: RunningGateway, client: httpx.Client, body: dict[str, Any],
                                      named: str) -> None:
    token = gateway.mint("viewer@app:web")
    response = explain(client, token, **body)
    assert response.status_code == 400, response.text
    assert named in response.json()["message"]


# --- OpenAPI, audit, JWKS ------------------------------------------------------------------------

def test_openapi_document_is_valid_and_covers_every_admin_route(gateway: RunningGateway,
                                                                client: httpx.Client) -> None:
    response = client.get(f"{V1}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["openapi"].startswith("3.0")
    errors = [str(e) for e in jsonschema_rs.Draft4Validator(OPENAPI_30).iter_errors(document)]
    assert errors == []
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    served = {(method, route.path) for route in create_api_app(gateway.services).routes
              if isinstance(route, Route) and route.path.startswith(f"{V1}/") and route.path != f"{V1}/openapi.json"
              for method in (route.methods or set()) if method != "HEAD"}
    assert served - documented == set()
    assert {("POST", f"{V1}/tokens"), ("GET", f"{V1}/tokens"), ("GET", f"{V1}/tokens/{{jti}}"),
            ("DELETE", f"{V1}/tokens/{{jti}}"), ("POST", f"{V1}/tokens/{{jti}}/rotate"),
            ("POST", f"{V1}/token/attenuate"), ("POST", f"{V1}/explain")} <= documented
    # Every $ref points at a schema that exists.
    text = json.dumps(document)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in document["components"]["schemas"], ref


def test_admin_operations_are_audited_without_token_strings(gateway: RunningGateway, client: httpx.Client,
                                                            admin: str) -> None:
    seen = len(gateway.audit_records())
    minted = mint(client, admin, "deployer@app:web-staging", name="audited")
    assert client.get(f"{V1}/tokens", headers=bearer(admin)).status_code == 200
    assert client.get(f"{V1}/tokens/{minted['jti']}", headers=bearer(admin)).status_code == 200
    rotated = client.post(f"{V1}/tokens/{minted['jti']}/rotate", headers=bearer(admin), json={"grace": "1m"})
    assert rotated.status_code == 201
    child = attenuate(client, rotated.json()["token"], "deployer@app:web-staging", ttl="1m")
    assert child.status_code == 201
    assert explain(client, admin, grants=["viewer@app:web"], method="GET", path="/v1/apps/web").status_code == 200
    assert client.delete(f"{V1}/tokens/{minted['jti']}", headers=bearer(admin)).status_code == 204
    outsider = gateway.mint("viewer@app:web", name="outsider")
    assert client.post(f"{V1}/tokens", headers=bearer(outsider), json={"grants": GOOD}).status_code == 403

    deadline = time.monotonic() + 3
    while len(gateway.audit_records()) < seen + 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    audited = gateway.audit_records()[seen:]
    by_action = [(r["action"], r["decision"], r["status"]) for r in audited]
    assert ("gateway:mint", "allow", 201) in by_action
    assert ("gateway:list", "allow", 200) in by_action
    assert ("gateway:show", "allow", 200) in by_action
    assert ("gateway:rotate", "allow", 201) in by_action
    assert ("gateway:revoke", "allow", 204) in by_action
    assert ("gateway:mint", "deny", 403) in by_action
    admin_jti = jti_of(admin)
    mint_record = next(r for r in audited if r["action"] == "gateway:mint" and r["decision"] == "allow")
    assert mint_record["jti"] == admin_jti and mint_record["token_name"] == "admin"
    assert minted["jti"] in str(mint_record["reason"])
    revoke_record = next(r for r in audited if r["action"] == "gateway:revoke")
    # Revoking the rotated-away token ends only it: its successor is no child of it.
    assert minted["jti"] in str(revoke_record["reason"]) and rotated.json()["jti"] not in str(revoke_record["reason"])
    attenuate_record = next(r for r in audited if r["path"] == f"{V1}/token/attenuate")
    assert attenuate_record["decision"] == "allow" and attenuate_record["status"] == 201
    assert attenuate_record["jti"] == rotated.json()["jti"]
    raw = gateway.audit_text()
    assert TOKEN_RE.search(raw) is None and UPSTREAM_SECRET not in raw
    for token in (admin, minted["token"], rotated.json()["token"], child.json()["token"], outsider):
        assert token.removeprefix("sgt_") not in raw
        assert token.split(".")[2] not in raw


def test_every_admin_operation_is_audited_with_a_gateway_action(gateway: RunningGateway, client: httpx.Client,
                                                                admin: str) -> None:
    # Attenuation mints a token and explain reads policy: an auditor filtering on gateway:* must see both.
    parent = gateway.mint("deployer@app:web-staging", name="parent")
    seen = len(gateway.audit_records())
    assert attenuate(client, parent, "deployer@app:web-staging", ttl="1m").status_code == 201
    assert attenuate(client, parent, "admin@app:web-staging", ttl="1m").status_code == 403
    assert explain(client, parent, method="GET", path=STAGING_MACHINES).status_code == 200
    assert explain(client, admin, grants=GOOD, method="GET", path="/v1/apps/web").status_code == 200
    deadline = time.monotonic() + 3
    while len(gateway.audit_records()) < seen + 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    audited = gateway.audit_records()[seen:]
    assert [r["path"] for r in audited] == [f"{V1}/token/attenuate"] * 2 + [f"{V1}/explain"] * 2
    actions = [r["action"] for r in audited]
    assert all(isinstance(a, str) and a.startswith("gateway:") for a in actions), (
        f"admin operations audited with actions {actions}")


def test_jwks_lists_the_active_key(gateway: RunningGateway, client: httpx.Client, admin: str) -> None:
    response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    active = gateway.services.keyring.active.kid
    assert active in {k["kid"] for k in keys}
    assert header(admin)["kid"] == active
    assert header(mint(client, admin, "viewer@app:web")["token"])["kid"] == active
    for key in keys:
        assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA"
        assert set(key) <= {"kty", "crv", "x", "kid", "alg", "use"}  # public material only
        assert "d" not in key
