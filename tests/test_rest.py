"""Fly's REST API surface (`/api/v1/...`) through a real gateway in front of a recording upstream:
organizations, builds, releases (with release ids remembered in the store) and logs, per app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.servers import RecordingUpstream, Reply, ServerThread

ORG = "acme"


@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    recorder = RecordingUpstream()
    server = ServerThread(recorder).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
        running = start_gateway(tmp_path_factory.mktemp("rest"), recorder, server,
                                upstream={"api_url": server.url, "org_slug": ORG})
    yield running
    running.server.stop()
    server.stop()


@pytest.fixture(scope="module")
def deployer(rest: RunningGateway) -> str:
    return rest.mint("deployer@app:web-staging", name="web-ci")


@pytest.fixture(autouse=True)
def _clean(rest: RunningGateway) -> None:
    rest.upstream.clear()
    rest.upstream.reply = Reply()
    rest.upstream.replies.clear()


def call(rest: RunningGateway, token: str, method: str, path: str, body: object | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"  # as flyctl's REST client sends it
    with rest.client() as client:
        return client.request(method, path, headers=headers,
                              content=None if body is None else json.dumps(body).encode())


def forwarded_once(rest: RunningGateway, response: httpx.Response, method: str, path: bytes, token: str) -> None:
    assert response.status_code == 200, response.text
    (got,) = rest.upstream.received
    assert (got.method, got.raw_path) == (method, path)
    assert got.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"] and token not in repr(got.headers)


def refused(rest: RunningGateway, response: httpx.Response, status: int = 403) -> str:
    assert response.status_code == status, response.text
    assert rest.upstream.received == []
    return str(response.json()["message"])


def test_the_gateways_own_organization_is_read(rest: RunningGateway, deployer: str) -> None:
    forwarded_once(rest, call(rest, deployer, "GET", f"/api/v1/organizations/{ORG}"), "GET",
                   f"/api/v1/organizations/{ORG}".encode(), deployer)


def test_another_organization_is_refused(rest: RunningGateway, deployer: str) -> None:
    response = call(rest, deployer, "GET", "/api/v1/organizations/other")
    assert "not the one this gateway serves" in refused(rest, response)


def test_builds_and_releases_of_the_tokens_app_are_forwarded(rest: RunningGateway, deployer: str) -> None:
    for path in ("/api/v1/builds", "/api/v1/builds/finish"):
        rest.upstream.clear()
        forwarded_once(rest, call(rest, deployer, "POST", path, {"app_name": "web-staging"}), "POST", path.encode(),
                       deployer)


@pytest.mark.parametrize("path", ["/api/v1/builds", "/api/v1/builds/finish", "/api/v1/releases"])
def test_builds_and_releases_of_another_app_are_refused(rest: RunningGateway, deployer: str, path: str) -> None:
    assert "web-prod" in refused(rest, call(rest, deployer, "POST", path, {"app_name": "web-prod"}))


def test_a_release_id_is_remembered_and_only_its_apps_tokens_may_update_it(rest: RunningGateway,
                                                                         deployer: str) -> None:
    rest.upstream.reply = Reply(body=json.dumps({"release": {"id": "rel_01JX", "version": 7}}).encode())
    created = call(rest, deployer, "POST", "/api/v1/releases", {"app_name": "web-staging", "image": "x"})
    assert created.status_code == 200 and created.json()["release"]["id"] == "rel_01JX"
    for status in ("running", "complete"):  # flyctl reports twice on one release
        rest.upstream.clear()
        forwarded_once(rest, call(rest, deployer, "PATCH", "/api/v1/releases/rel_01JX", {"status": status}),
                       "PATCH", b"/api/v1/releases/rel_01JX", deployer)
    other = rest.mint("deployer@app:web-prod")
    rest.upstream.clear()
    assert "web-staging" in refused(rest, call(rest, other, "PATCH", "/api/v1/releases/rel_01JX", {"status": "x"}))


def test_a_release_id_the_gateway_did_not_see_is_refused(rest: RunningGateway, deployer: str) -> None:
    message = refused(rest, call(rest, deployer, "PATCH", "/api/v1/releases/rel_forged", {"status": "complete"}))
    assert "not created through this gateway" in message


def test_a_refused_release_answer_is_not_remembered(rest: RunningGateway, deployer: str) -> None:
    rest.upstream.reply = Reply(status=422, body=json.dumps({"release": {"id": "rel_bad"}}).encode())
    assert call(rest, deployer, "POST", "/api/v1/releases", {"app_name": "web-staging"}).status_code == 422
    rest.upstream.clear()
    refused(rest, call(rest, deployer, "PATCH", "/api/v1/releases/rel_bad", {"status": "complete"}))


def test_release_ids_are_shared_through_the_store(rest: RunningGateway, deployer: str, tmp_path: Path,
                                                  upstream: tuple[RecordingUpstream, ServerThread],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rest.upstream.reply = Reply(body=json.dumps({"release": {"id": "rel_shared"}}).encode())
    assert call(rest, deployer, "POST", "/api/v1/releases", {"app_name": "web-staging"}).status_code == 200
    # A second instance on the same store (the first one's config folder: same state.db and keyring).
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    second = start_gateway(rest.config.base_dir, *upstream, upstream={"api_url": upstream[1].url, "org_slug": ORG})
    try:
        with second.client() as client:
            answer = client.patch("/api/v1/releases/rel_shared", content=b'{"status":"complete"}',
                                  headers={"Authorization": f"Bearer {deployer}", "Content-Type": "application/json"})
        assert answer.status_code == 200 and upstream[0].received[-1].raw_path == b"/api/v1/releases/rel_shared"
    finally:
        second.server.stop()


def test_depot_builders_only_for_the_app(rest: RunningGateway, deployer: str) -> None:
    message = refused(rest, call(rest, deployer, "POST", "/api/v1/builds/depot_builder",
                                 {"app_name": "web-staging", "builder_scope": "org"}))
    assert "--depot-scope=app" in message
    forwarded_once(rest, call(rest, deployer, "POST", "/api/v1/builds/depot_builder",
                              {"app_name": "web-staging", "builder_scope": "app"}),
                   "POST", b"/api/v1/builds/depot_builder", deployer)


def test_logs_per_app(rest: RunningGateway, deployer: str) -> None:
    forwarded_once(rest, call(rest, deployer, "GET", "/api/v1/apps/web-staging/logs?next_token=abc"), "GET",
                   b"/api/v1/apps/web-staging/logs", deployer)
    assert rest.upstream.received[0].query == b"next_token=abc"
    rest.upstream.clear()
    refused(rest, call(rest, deployer, "GET", "/api/v1/apps/web-prod/logs"))


def test_managed_builders_and_unknown_paths_are_refused(rest: RunningGateway, deployer: str) -> None:
    assert "--image" in refused(rest, call(rest, deployer, "POST", f"/api/v1/organizations/{ORG}/builders", {}))
    response = call(rest, deployer, "GET", "/api/v1/tokens")
    refused(rest, response)
    assert response.json()["error"] == "unknown_route"


def test_viewers_read_logs_but_do_not_write_releases(rest: RunningGateway) -> None:
    viewer = rest.mint("viewer@app:web-staging")
    assert call(rest, viewer, "GET", "/api/v1/apps/web-staging/logs").status_code == 200
    rest.upstream.clear()
    response = call(rest, viewer, "POST", "/api/v1/releases", {"app_name": "web-staging"})
    assert "releases:write" in refused(rest, response)


# --- the red team's findings, each a regression test -------------------------------------------------

def send(rest: RunningGateway, token: str, method: str, path: str, body: bytes | None,
         content_type: str = "application/json") -> httpx.Response:
    with rest.client() as client:
        return client.request(method, path, content=body, headers={"Authorization": f"Bearer {token}",
                                                                    "Content-Type": content_type})


@pytest.mark.parametrize(("name", "method", "path", "body", "content_type", "why"), [
    ("form body beside the JSON app", "POST", "/api/v1/builds?app_name=web-prod",
     b'{"app_name":"web-staging","x":"&app_name=web-prod&"}', "application/x-www-form-urlencoded", "application/json"),
    ("query app beside the JSON app", "POST", "/api/v1/builds?app_name=web-prod", b'{"app_name":"web-staging"}',
     "application/json", "query string"),
    ("form content type", "POST", "/api/v1/builds", b'{"app_name":"web-staging"}', "application/x-www-form-urlencoded",
     "application/json"),
    ("text content type", "POST", "/api/v1/releases", b'{"app_name":"web-staging"}', "text/plain", "application/json"),
    ("query app beside a cased body key", "POST", "/api/v1/builds?app_name=web-prod", b'{"APP_NAME":"web-staging"}',
     "application/json", "'APP_NAME'"),
    ("cased app key", "POST", "/api/v1/releases", b'{"App_Name":"web-staging"}', "application/json", "'App_Name'"),
    ("nested wrapper naming another app", "POST", "/api/v1/releases",
     b'{"app_name":"web-staging","release":{"app_name":"web-prod"}}', "application/json", "top level"),
    ("cased builder scope", "POST", "/api/v1/builds/depot_builder", b'{"app_name":"web-staging","Builder_Scope":"app"}',
     "application/json", "'Builder_Scope'"),
    ("builder scope in the query", "POST", "/api/v1/builds/depot_builder?builder_scope=org",
     b'{"app_name":"web-staging","builder_scope":"app"}', "application/json", "query string"),
    ("deep nesting", "POST", "/api/v1/builds", b'{"app_name":"web-staging","x":' + b"[" * 100_000 + b"]" * 100_000
     + b"}", "application/json", "too deeply"),
    ("query on a release update", "PATCH", "/api/v1/releases/rel_x?id=8", b'{"status":"complete"}', "application/json",
     "query string"),
    ("body on logs", "GET", "/api/v1/apps/web-staging/logs", b'{"app_name":"web-prod"}', "application/json",
     "takes no body"),
    ("another app in a release update", "PATCH", "/api/v1/releases/rel_x",
     b'{"status":"complete","app_name":"web-prod"}', "application/json", "not created through"),
])
def test_bodies_and_queries_the_upstream_could_read_otherwise_are_refused(
        rest: RunningGateway, deployer: str, name: str, method: str, path: str, body: bytes, content_type: str,
        why: str) -> None:
    response = send(rest, deployer, method, path, body, content_type)
    assert response.status_code in (400, 403), response.text
    assert why in response.json()["message"], response.json()["message"]
    assert rest.upstream.received == []


def test_the_forwarded_body_is_json_to_the_upstream(rest: RunningGateway, deployer: str) -> None:
    response = send(rest, deployer, "POST", "/api/v1/builds", b'{"app_name":"web-staging"}',
                    "application/json; charset=utf-8")
    assert response.status_code == 200
    (got,) = rest.upstream.received
    assert got.header("content-type") == ["application/json"] and got.body == b'{"app_name":"web-staging"}'


def test_a_release_update_naming_another_app_is_refused(rest: RunningGateway, deployer: str) -> None:
    rest.upstream.reply = Reply(body=json.dumps({"release": {"id": "rel_named"}}).encode())
    assert call(rest, deployer, "POST", "/api/v1/releases", {"app_name": "web-staging"}).status_code == 200
    rest.upstream.clear()
    response = send(rest, deployer, "PATCH", "/api/v1/releases/rel_named",
                    b'{"status":"complete","app_name":"web-prod"}')
    assert response.status_code == 400 and "web-prod" in response.json()["message"]
    assert rest.upstream.received == []
