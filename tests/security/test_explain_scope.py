"""`POST /_gateway/v1/explain` answers for the caller's own grants only (issue 15, class 8).

Explain shows the policy line and the grant that decide a request: for another token or an
arbitrary grant set that is a map of what others may do, a token-admin's business. A token may
explain itself, or some of its own grants (each within one it holds, as attenuation would
accept), or name itself in `token`; anything else is a 403 that names the grant or field that is
not the caller's. Nothing is ever forwarded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway
from tests.security.harness import reset, running_gateway

EXPLAIN = "/_gateway/v1/explain"
CREATE_PROD = {"method": "POST", "path": "/v1/apps", "body": {"name": "web-pr-1-prod", "org_slug": "acme"}}
CREATE_PR = {"method": "POST", "path": "/v1/apps", "body": {"name": "web-pr-1", "org_slug": "acme"}}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-explain")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def tokens(shared: RunningGateway) -> dict[str, str]:
    return {"pr": shared.mint("deployer@app:web-pr-*", name="pr-job"),
            "other": shared.mint("admin@app:web-prod", name="prod-admin"),
            "admin": shared.mint("token-admin@gateway", name="token-admin")}


@pytest.fixture
def gw(shared: RunningGateway) -> Iterator[RunningGateway]:
    yield reset(shared)
    assert shared.upstream.received == []  # a dry run, whoever asks


def explain(gw: RunningGateway, caller: str, **body: Any) -> httpx.Response:
    with gw.client() as client:
        return client.post(EXPLAIN, json=body, headers={"Authorization": f"Bearer {caller}"})


@pytest.mark.parametrize("grants", [
    pytest.param(["admin@app:*"], id="a-wider-grant"),
    pytest.param(["deployer@app:web-prod"], id="another-app"),
    pytest.param(["deployer@env:production"], id="an-environment"),
    pytest.param(["deployer@app:web-pr-1-prod"], id="a-name-the-pattern-matches-in-production"),
    pytest.param(["deployer@app:web-pr-1", "viewer@app:web-prod"], id="one-of-them-not-held"),
])
def test_a_non_admin_cannot_explain_grants_it_does_not_hold(gw: RunningGateway, tokens: dict[str, str],
                                                            grants: list[str]) -> None:
    response = explain(gw, tokens["pr"], grants=grants, **CREATE_PROD)
    assert response.status_code == 403, response.text
    document = response.json()
    assert document["error"] == "forbidden"
    assert "not within your token's own grants (deployer@app:web-pr-*)" in document["message"]
    assert "token-admin@gateway" in document["message"]
    assert "allowed" not in document  # no explanation leaks with the refusal


@pytest.mark.parametrize("which", ["other", "admin", "garbage"])
def test_a_non_admin_cannot_explain_another_token(gw: RunningGateway, tokens: dict[str, str], which: str) -> None:
    other = tokens.get(which, "sgt_not-a-token")
    response = explain(gw, tokens["pr"], token=other, method="GET", path="/v1/apps/web-prod")
    # 403 for a malformed one too: a non-admin learns nothing about a token string it sends.
    assert response.status_code == 403, response.text
    assert response.json()["message"] == ("field 'token' is not the token you call with; explaining other grants "
                                          "or another token needs token-admin@gateway. Omit 'token' to explain "
                                          "for your own token")  # the same words whichever token it was
    assert "sgt_" not in response.text


def test_grants_and_token_together_are_refused(gw: RunningGateway, tokens: dict[str, str]) -> None:
    response = explain(gw, tokens["admin"], grants=["viewer@app:web"], token=tokens["pr"], method="GET",
                       path="/v1/apps/web")
    assert response.status_code == 400 and "not both" in response.json()["message"]


def test_a_token_explains_itself_and_its_own_grants(gw: RunningGateway, tokens: dict[str, str]) -> None:
    for body in ({}, {"token": tokens["pr"]}, {"grants": ["deployer@app:web-pr-*"]},
                 {"grants": ["deployer@app:web-pr-1"]}):
        response = explain(gw, tokens["pr"], **body, **CREATE_PR)
        assert response.status_code == 200, (body, response.text)
        assert response.json()["allowed"] is True, body
    refused = explain(gw, tokens["pr"], **CREATE_PROD).json()
    assert refused["allowed"] is False and refused["env"] == "production"


def test_a_token_admin_explains_any_grant_set_or_token(gw: RunningGateway, tokens: dict[str, str]) -> None:
    response = explain(gw, tokens["admin"], grants=["admin@app:web-prod"], method="DELETE", path="/v1/apps/web-prod")
    assert response.status_code == 200 and response.json()["allowed"] is True
    response = explain(gw, tokens["admin"], token=tokens["other"], method="DELETE", path="/v1/apps/web-prod")
    assert response.status_code == 200 and response.json()["grant"] == "admin@app:web-prod"
    # A malformed token is the admin's input error, named (422), never the caller's own 401.
    assert explain(gw, tokens["admin"], token="sgt_not-a-token", method="GET", path="/v1/apps/web").status_code == 422
