"""Explain agrees with the request path (issue 16 item 6): the same decision, body constraints
included, and the constraint that decided named. Each case is explained through the admin API with
the caller's own token and then sent for real; both must say the same.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import RunningGateway

IMAGES = "deployers ship images from the app's own Fly registry"
SIZE = "production machines stay within size and regions"
EXEC = "exec runs only diagnostic commands"
STAGING = "/v1/apps/web-staging/machines"
PROD = "/v1/apps/web-prod/machines"

CASES: list[Any] = [
    pytest.param("deployer@app:web-staging", "POST", STAGING, {"config": {"image": "docker.io/x"}}, IMAGES,
                 id="foreign-image"),
    pytest.param("deployer@app:web-staging", "POST", STAGING,
                 {"config": {"image": "registry.fly.io/web-staging:1"}}, None, id="own-image"),
    pytest.param("deployer@app:web-staging", "POST", STAGING,
                 {"config": {"containers": [{"image": "registry.fly.io/web-prod:1"}]}}, IMAGES,
                 id="another-apps-image-in-a-container"),
    pytest.param("deployer@app:web-prod", "POST", PROD,
                 {"config": {"image": "registry.fly.io/web-prod:1", "guest": {"cpus": 64}}}, SIZE,
                 id="oversized-production-machine"),
    pytest.param("admin@app:web-prod", "POST", f"{PROD}/m1/exec", {"command": ["sh", "-c", "env"]}, EXEC,
                 id="exec-outside-the-allow-list"),
    pytest.param("admin@app:web-prod", "POST", f"{PROD}/m1/exec", {"command": ["uptime"]}, None,
                 id="exec-allowed"),
    # No constraint applies here, but the request path still reads the body and its placement.
    pytest.param("deployer@app:web-staging", "POST", "/v1/apps", {"app_name": "web-staging",
                                                                   "org_slug": "someone-else"}, None,
                 id="app-placed-in-another-org"),
]


@pytest.mark.parametrize(("grant", "method", "path", "body", "constraint"), CASES)
def test_explain_says_what_the_request_gets(gateway: RunningGateway, grant: str, method: str, path: str,
                                            body: dict[str, Any], constraint: str | None) -> None:
    token = gateway.mint(grant, name="explain-agrees")
    headers = {"Authorization": f"Bearer {token}"}
    with gateway.client() as client:
        explained = client.post("/_gateway/v1/explain", headers=headers,
                                json={"method": method, "path": path, "body": body})
        assert explained.status_code == 200, explained.text
        assert gateway.upstream.received == []
        real = client.request(method, path, headers={**headers, "content-type": "application/json"},
                              content=json.dumps(body).encode())
    result = explained.json()
    assert result["status"] == real.status_code, (result, real.text)
    assert result["allowed"] is (real.status_code == 200)
    assert result["constraint"] == constraint
    if real.status_code != 200:
        assert result["reason"] == real.json()["message"]  # the same words as the refusal
    else:
        assert len(gateway.upstream.received) == 1
