"""Admin API additions of issue 16: list filters, `GET /_gateway/v1/token/self`, 401 hints intact.

Through a real gateway (the conftest's function-scoped `gateway`, in front of a recording upstream).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx

from tests.conftest import RunningGateway

V1 = "/_gateway/v1"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def jti_of(token: str) -> str:
    part = token.removeprefix("sgt_").split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["jti"])


def listed(client: httpx.Client, admin: str, **params: str) -> set[str]:
    response = client.get(f"{V1}/tokens", headers=bearer(admin), params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["filters"] == {k: v for k, v in params.items() if k != "active"} | (
        {"state": "active"} if params.get("active") == "true" else {})
    return {r["jti"] for r in body["tokens"]}


def test_a_401_keeps_the_hint_it_gives(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        cases = [({}, "no token; send 'Authorization: Bearer sgt_...'"),
                 ({"Authorization": "Basic dXNlcjpwYXNz"}, "Authorization must be 'Bearer sgt_...' or 'FlyV1 sgt_...'")]
        for headers, message in cases:
            for path in (f"{V1}/tokens", "/v1/apps/web-staging/machines"):
                response = client.get(path, headers=headers)
                assert response.status_code == 401
                assert response.json()["message"] == message
        # A real token's text is still cut wherever it is echoed.
        admin = gateway.mint("token-admin@gateway", name="hint-admin")
        response = client.get(f"{V1}/tokens/{admin}", headers=bearer(admin))
        assert response.status_code == 404
        assert admin.removeprefix("sgt_") not in response.text and "sgt_[redacted]" in response.text


def test_list_filters_by_grant_app_subject_and_state(gateway: RunningGateway) -> None:
    admin = gateway.mint("token-admin@gateway", name="admin")
    env_staging = gateway.mint("viewer@env:staging", name="env")
    glob = gateway.mint("deployer@app:*", name="glob", subject="ci:github:acme/web")
    prod = gateway.mint("viewer@app:web-prod", name="prod")
    gone = gateway.mint("viewer@app:api-staging", name="gone")
    gateway.revoke(jti_of(gone))
    with gateway.client() as client:
        assert listed(client, admin, app="web-staging") == {jti_of(env_staging), jti_of(glob)}
        assert listed(client, admin, app="web-prod") == {jti_of(glob), jti_of(prod)}
        assert listed(client, admin, app="api-staging") == {jti_of(env_staging), jti_of(glob), jti_of(gone)}
        assert listed(client, admin, app="api-staging", state="active") == {jti_of(env_staging), jti_of(glob)}
        assert listed(client, admin, grant="viewer@app:web-prod") == {jti_of(prod)}
        assert listed(client, admin, subject="ci:github:*") == {jti_of(glob)}
        assert listed(client, admin, state="revoked") == {jti_of(gone)}
        assert jti_of(gone) not in listed(client, admin, active="true")
        for params, named in (({"apps": "web"}, "apps"), ({"state": "dead"}, "state"),
                              ({"active": "true", "state": "revoked"}, "active")):
            response = client.get(f"{V1}/tokens", headers=bearer(admin), params=params)
            assert response.status_code == 400, params
            assert named in response.json()["message"]


def test_token_self_describes_the_callers_own_token(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-prod", "viewer@env:staging", name="me", subject="ci:me")
    with gateway.client() as client:
        response = client.get(f"{V1}/token/self", headers=bearer(token))
        assert response.status_code == 200, response.text
        me = response.json()
        assert "token" not in me and token.removeprefix("sgt_") not in response.text
        assert (me["jti"], me["name"], me["sub"], me["state"]) == (jti_of(token), "me", "ci:me", "active")
        assert me["grants"] == ["deployer@app:web-prod", "viewer@env:staging"]
        may = {(row["grant"], row["env"]): row["actions"] for row in me["may"]}
        # The policy's production deny shows: a deployer may not write secrets in production.
        assert "machines:deploy" in may[("deployer@app:web-prod", "production")]
        assert "secrets:write" not in may[("deployer@app:web-prod", "production")]
        assert "apps:read" in may[("viewer@env:staging", "staging")]
        admin = gateway.mint("token-admin@gateway", name="admin")
        admin_may = client.get(f"{V1}/token/self", headers=bearer(admin)).json()["may"]
        assert admin_may == [{"grant": "token-admin@gateway", "env": None, "actions": ["gateway:*"]}]
        assert client.get(f"{V1}/token/self").status_code == 401
        gateway.revoke(jti_of(token))
        deadline = time.monotonic() + 5  # the running gateway sees a revocation within a second
        while client.get(f"{V1}/token/self", headers=bearer(token)).status_code != 401:
            assert time.monotonic() < deadline, "a revoked token still describes itself"
            time.sleep(0.05)
