"""Pattern grants stay in their pattern's environment (issue 15, class 5).

`deployer@app:web-pr-*` (a PR job's token) could create `web-pr-1-prod`, which the environment
rules (`*-prod` -> production) class as production: every `*@env:production` grant and every
production-only policy line would then apply to an app a PR job planted, and the pattern grant
itself would act in production. An `app:GLOB` grant now covers an app only in the environment the
rules give the pattern itself (`web-pr-*`: development); `app:*` alone spans every environment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import CREDENTIAL_ENV, RunningGateway, start_gateway
from tests.security.harness import (
    CREDENTIAL,
    assert_forwarded_exactly,
    assert_refused,
    request,
    reset,
    send,
)
from tests.servers import RecordingUpstream, Reply, ServerThread

PR_GRANT = "deployer@app:web-pr-*"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway whose every surface (Machines, GraphQL, registry) goes to one recording upstream."""
    recorder = RecordingUpstream()
    server = ServerThread(recorder).start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(CREDENTIAL_ENV, CREDENTIAL)
            gateway = start_gateway(tmp_path_factory.mktemp("sec-patterns"), recorder, server,
                                    upstream={"graphql_url": f"{server.url}/graphql", "registry_url": server.url,
                                              "org_slug": "acme"})
            try:
                yield gateway
            finally:
                gateway.server.stop()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pr_token(shared: RunningGateway) -> str:
    return shared.mint(PR_GRANT, name="pr-job")


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


def create(name_field: str, name: str) -> bytes:
    return json.dumps({name_field: name, "org_slug": "acme"}).encode()


MACHINE = json.dumps({"config": {"image": "registry.fly.io/web-pr-1-prod:1"}}).encode()


@pytest.mark.parametrize("name_field", ["name", "app_name"])
@pytest.mark.parametrize("app", ["web-pr-1-prod", "web-pr-1-staging"])
def test_a_pr_token_cannot_create_an_app_in_another_environment(gw: RunningGateway, pr_token: str, app: str,
                                                                name_field: str) -> None:
    answer = send(gw, request("POST", b"/v1/apps", token=pr_token, body=create(name_field, app),
                              headers=[(b"content-type", b"application/json")]))
    assert_refused(gw, answer, 403, "forbidden")
    message = answer.json()["message"]
    assert f"app {app}" in message
    assert f"{PR_GRANT} matches the name but stays in environment development" in message


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", b"/v1/apps/web-pr-1-prod", None),
    ("GET", b"/v1/apps/web-pr-1-prod/machines", None),
    ("POST", b"/v1/apps/web-pr-1-prod/machines", MACHINE),
    ("POST", b"/v1/apps/web-pr-1-prod/machines/m1/stop", None),
    ("POST", b"/v1/apps/web-pr-1-prod/secrets", b'{"values":{"A":"b"}}'),
])
def test_a_pr_token_cannot_act_on_a_production_app_its_pattern_matches(gw: RunningGateway, pr_token: str,
                                                                       method: str, path: bytes,
                                                                       body: bytes | None) -> None:
    headers = [(b"content-type", b"application/json")] if body is not None else []
    answer = send(gw, request(method, path, token=pr_token, body=body, headers=headers))
    assert_refused(gw, answer, 403, "forbidden")


def test_the_pr_token_still_creates_and_deploys_its_own_apps(gw: RunningGateway, pr_token: str) -> None:
    body = create("name", "web-pr-1")
    answer = send(gw, request("POST", b"/v1/apps", token=pr_token, body=body,
                              headers=[(b"content-type", b"application/json")]))
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="POST", raw_path=b"/v1/apps", body=body, client_tokens=[pr_token])

    reset(gw)
    machine = json.dumps({"config": {"image": "registry.fly.io/web-pr-1:1"}}).encode()
    answer = send(gw, request("POST", b"/v1/apps/web-pr-1/machines", token=pr_token, body=machine,
                              headers=[(b"content-type", b"application/json")]))
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="POST", raw_path=b"/v1/apps/web-pr-1/machines", body=machine,
                             client_tokens=[pr_token])


def test_the_filtered_app_listing_leaves_out_a_production_app_the_pattern_matches(gw: RunningGateway,
                                                                                  pr_token: str) -> None:
    apps = [{"name": name} for name in ("web-pr-1", "web-pr-1-prod", "web-pr-2-staging", "web-prod")]
    gw.upstream.reply = Reply(body=json.dumps({"apps": apps, "total_apps": 4}).encode())
    answer = send(gw, request("GET", b"/v1/apps?org_slug=acme", token=pr_token))
    assert answer.status == 200, answer.body
    assert [app["name"] for app in answer.json()["apps"]] == ["web-pr-1"]


def test_attenuation_cannot_pin_the_pattern_to_a_production_name(gw: RunningGateway, pr_token: str) -> None:
    # `deployer@app:web-pr-1-prod` is a literal the glob matches, but in production: not within it.
    with gw.client() as client:
        refused = client.post("/_gateway/v1/token/attenuate", json={"grants": ["deployer@app:web-pr-1-prod"]},
                              headers={"Authorization": f"Bearer {pr_token}"})
        assert refused.status_code == 403, refused.text
        assert "not within" in refused.json()["message"]
        narrowed = client.post("/_gateway/v1/token/attenuate", json={"grants": ["deployer@app:web-pr-1"]},
                               headers={"Authorization": f"Bearer {pr_token}"})
        assert narrowed.status_code == 201, narrowed.text
    assert gw.upstream.received == []


def test_an_org_wide_grant_still_spans_every_environment(gw: RunningGateway) -> None:
    token = gw.mint("viewer@app:*", name="org-viewer")
    answer = send(gw, request("GET", b"/v1/apps/web-pr-1-prod", token=token))
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="GET", raw_path=b"/v1/apps/web-pr-1-prod", client_tokens=[token])


def test_a_pattern_of_a_production_shape_reaches_production_only(gw: RunningGateway) -> None:
    token = gw.mint("viewer@app:web*-prod", name="prod-viewer")
    assert send(gw, request("GET", b"/v1/apps/web-prod", token=token)).status == 200
    reset(gw)
    answer = send(gw, request("GET", b"/v1/apps/web-pr-1", token=token))
    assert_refused(gw, answer, 403, "forbidden")


@pytest.mark.parametrize("query", [
    pytest.param('{ app(name: "web-pr-1-prod") { id name } }', id="read"),
    pytest.param('mutation { createApp(input: {name: "web-pr-1-prod", organizationId: "acme"}) { app { id } } }',
                 id="createApp"),
])
def test_graphql_refuses_the_production_app_too(gw: RunningGateway, pr_token: str, query: str) -> None:
    answer = send(gw, request("POST", b"/graphql", token=pr_token, body=json.dumps({"query": query}).encode(),
                              headers=[(b"content-type", b"application/json")]))
    assert answer.status == 200, answer.body  # GraphQL refusals travel as 200 with errors (docs/graphql.md)
    (error,) = answer.json()["errors"]
    assert error["extensions"]["code"] == "FORBIDDEN" and error["extensions"]["status"] == 403
    assert gw.upstream.received == []


def test_the_registry_refuses_the_production_app_and_serves_the_pr_app(gw: RunningGateway, pr_token: str) -> None:
    answer = send(gw, request("GET", b"/v2/web-pr-1-prod/tags/list", token=pr_token))
    assert_refused(gw, answer, 403)
    assert b"DENIED" in answer.body
    answer = send(gw, request("GET", b"/v2/web-pr-1/tags/list", token=pr_token))
    assert answer.status == 200, answer.body
    assert [r.raw_path for r in gw.upstream.received] == [b"/v2/web-pr-1/tags/list"]
