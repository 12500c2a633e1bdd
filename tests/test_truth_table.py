"""The core issue's truth table, over the shipped policy files, through a real gateway.

S: forwarded exactly as sent, with the upstream credential injected. D: 403 and the upstream
receives nothing.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import UPSTREAM_SECRET, RunningGateway

S, D = "S", "D"
TABLE: list[tuple[str, str, str, object, str]] = [
    ("viewer@app:web-staging", "GET", "/v1/apps/web-staging/machines", None, S),
    ("viewer@app:web-staging", "POST", "/v1/apps/web-staging/machines", {"config": {}}, D),
    ("viewer@app:web-staging", "GET", "/v1/apps/web-prod/machines", None, D),
    ("deployer@app:web-staging", "POST", "/v1/apps/web-staging/machines", {"config": {}}, S),
    ("deployer@app:web-staging", "POST", "/v1/apps/web-staging/machines/m1/start", None, S),
    ("deployer@app:web-staging", "POST", "/v1/apps/web-staging/secrets", {"values": {"A": "b"}}, S),
    ("deployer@app:web-staging", "GET", "/v1/apps/web-staging/secrets?show_secrets=true", None, D),
    ("deployer@app:web-staging", "DELETE", "/v1/apps/web-staging", None, D),
    ("deployer@app:web-staging", "POST", "/v1/apps/web-prod/machines", {"config": {}}, D),
    ("deployer@env:staging", "POST", "/v1/apps/api-staging/machines", {"config": {}}, S),
    ("deployer@env:staging", "POST", "/v1/apps/api-prod/machines", {"config": {}}, D),
    ("deployer@app:web-prod", "POST", "/v1/apps/web-prod/machines", {"config": {}}, S),
    ("deployer@app:web-prod", "POST", "/v1/apps/web-prod/secrets", {"values": {"A": "b"}}, D),
    ("operator@app:web-prod", "POST", "/v1/apps/web-prod/machines/m1/restart", None, S),
    ("operator@app:web-prod", "POST", "/v1/apps/web-prod/machines", {"config": {}}, D),
    ("admin@app:web-prod", "DELETE", "/v1/apps/web-prod", None, S),
    ("admin@app:web-prod", "GET", "/v1/apps/web-prod/secrets?show_secrets=true", None, S),
    ("admin@app:web-prod", "POST", "/v1/apps/web-prod/deploy_token", {"expiry": "1h"}, D),
    ("deployer@app:web-pr-*", "POST", "/v1/apps", {"name": "web-pr-42", "org_slug": "acme"}, S),
    ("deployer@app:web-pr-*", "POST", "/v1/apps", {"name": "web-prod", "org_slug": "acme"}, D),
]


@pytest.mark.parametrize(("grant", "method", "target", "body", "expected"), TABLE,
                         ids=[f"{g} {m} {t} -> {e}" for g, m, t, _, e in TABLE])
def test_truth_table(gateway: RunningGateway, grant: str, method: str, target: str, body: object,
                     expected: str) -> None:
    token = gateway.mint(grant, name="truth-table")
    content = json.dumps(body).encode() if body is not None else None
    with gateway.client() as client:
        response = client.request(method, target, content=content, headers={"Authorization": f"Bearer {token}"})
    received = gateway.upstream.received
    if expected == S:
        assert response.status_code == 200, response.text
        assert len(received) == 1
        got = received[0]
        path, _, query = target.partition("?")
        assert got.method == method
        assert got.raw_path == path.encode()
        assert got.query == query.encode()
        assert got.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]
        assert token not in repr(got.headers)
        assert got.body == (content or b"")
    else:
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "forbidden"
        assert received == []


def test_unknown_route_is_403_unknown_route(gateway: RunningGateway) -> None:
    token = gateway.mint("admin@app:*")
    with gateway.client() as client:
        response = client.get("/v1/no/such/route", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert response.json()["error"] == "unknown_route"
    assert gateway.upstream.received == []
