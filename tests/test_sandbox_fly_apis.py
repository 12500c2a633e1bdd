"""The sandbox's GraphQL and REST (`/api/v1`) stand-ins, driven in-process without flyctl.

Why: tests/contract/test_flyctl_sandbox.py proves the real flyctl works against them, but only
where flyctl is installed; these pin the same behaviour everywhere: Fly's schema really validates
documents (errors in the standard shape), answers come from the sandbox's state rather than mocks,
the documents recorded from flyctl all still execute, and the token check holds on the new routes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.dev.sandbox import SANDBOX_ORG_SLUG, SandboxState, create_sandbox_app
from tests.servers import ServerThread

TOKEN = "sandbox-upstream-credential"
DOCUMENTS = Path(__file__).parent / "contract" / "flyctl_documents"


class Client(httpx.Client):
    """An HTTP client to a sandbox served on loopback, holding the sandbox app for its state."""

    def __init__(self, sandbox: Starlette, base_url: str, scheme: str = "Bearer") -> None:
        super().__init__(base_url=base_url, headers={"Authorization": f"{scheme} {TOKEN}"}, timeout=10)
        self.sandbox = sandbox


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerThread, list[Starlette]]]:
    """One uvicorn for the module; each test swaps in a fresh sandbox behind it."""
    current: list[Starlette] = []

    async def dispatch(scope: Any, receive: Any, send: Any) -> None:
        await current[0](scope, receive, send)

    running = ServerThread(dispatch).start()
    try:
        yield running, current
    finally:
        running.stop()


def serve(server: tuple[ServerThread, list[Starlette]], scheme: str = "Bearer") -> Client:
    running, current = server
    current[:] = [create_sandbox_app(expected_token=TOKEN)]
    return Client(current[0], running.url, scheme)


@pytest.fixture
def client(server: tuple[ServerThread, list[Starlette]]) -> Iterator[Client]:
    with serve(server) as c:
        yield c


def state(client: Client) -> SandboxState:
    found = client.sandbox.state.sandbox
    assert isinstance(found, SandboxState)
    return found


def gql(client: Client, query: str, **variables: Any) -> dict[str, Any]:
    response = client.post("/graphql", json={"query": query, "variables": variables})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


def test_the_schema_ships_inside_the_package() -> None:
    """The product must not read ../shared at run time: the sandbox executes the package's copy, the
    one the gateway validates documents with, in a schema object of its own."""
    import gateway.dev.sandbox_graphql as module
    from gateway.surfaces.graphql.surface import SCHEMA_FILE, load_schema

    assert SCHEMA_FILE.is_file() and SCHEMA_FILE.parent.name == "graphql"
    assert module.fly_schema().query_type is not None
    assert module.fly_schema() is not load_schema()


@pytest.mark.parametrize("document", sorted(DOCUMENTS.glob("*.graphql")), ids=lambda p: p.stem)
def test_every_document_flyctl_sent_executes_without_errors(client: Client, document: Path) -> None:
    variables = {"appName": "web-staging", "imageRef": "registry.fly.io/web-staging:v2", "limit": 5,
                 "admin": False, "image": "flyio/postgres-flex", "flyVersion": "0.4.87"}
    body = gql(client, document.read_text(encoding="utf-8"), **variables)
    assert "errors" not in body and body["data"]


def test_invalid_documents_get_standard_graphql_errors(client: Client) -> None:
    unknown = gql(client, "{ app(name: \"web-staging\") { noSuchField } }")
    assert "data" not in unknown
    assert unknown["errors"][0]["message"] == "Cannot query field 'noSuchField' on type 'App'."
    assert unknown["errors"][0]["locations"] == [{"line": 1, "column": 30}]
    syntax = gql(client, "{ app(")
    assert syntax["errors"][0]["message"].startswith("Syntax Error")
    assert client.post("/graphql", content=b"not json").status_code == 400


def test_answers_come_from_the_sandbox_state(client: Client) -> None:
    state(client).apps["web-staging"].network = "custom-net"
    body = gql(client, "query($n: String!) { app(name: $n) { name network organization { slug } "
                       "currentReleaseUnprocessed { version status } machines { nodes { id } } } }", n="web-staging")
    app = body["data"]["app"]
    assert app["network"] == "custom-net" and app["organization"]["slug"] == SANDBOX_ORG_SLUG
    assert app["currentReleaseUnprocessed"] == {"version": 1, "status": "complete"}
    assert [m["id"] for m in app["machines"]["nodes"]] == list(state(client).apps["web-staging"].machines)
    missing = gql(client, "{ app(name: \"nope\") { name } }")
    assert missing["data"] == {"app": None} and missing["errors"][0]["message"] == "Could not find App"


def test_fields_without_a_resolver_are_null_or_empty_as_the_schema_allows(client: Client) -> None:
    body = gql(client, "{ app(name: \"web-staging\") { cnameTarget certificates { totalCount nodes { id } } "
                       "vmSize { name cpuCores } } }")
    assert "errors" not in body
    assert body["data"]["app"] == {"cnameTarget": None, "certificates": {"totalCount": 0, "nodes": None},
                                   "vmSize": {"name": "", "cpuCores": 0.0}}


def test_mutations_the_sandbox_does_not_emulate_fail_loudly(client: Client) -> None:
    body = gql(client, "mutation { deleteApp(appId: \"web-staging\") { organization { id } } }")
    assert body["errors"][0]["message"] == "the sandbox does not emulate the mutation deleteApp"
    assert "web-staging" in state(client).apps


def test_release_lifecycle_over_uiex(client: Client) -> None:
    build = client.post("/api/v1/builds", json={"app_name": "web-staging", "builder_type": "local"}).json()
    finished = client.post("/api/v1/builds/finish",
                           json={"build_id": build["id"], "app_name": "web-staging", "status": "completed"})
    assert finished.json()["status"] == "completed"
    created = client.post("/api/v1/releases", json={"app_name": "web-staging", "build_id": build["id"],
                                                    "image": "registry.fly.io/web-staging:v2", "strategy": "ROLLING",
                                                    "definition": {"app": "web-staging"}})
    assert created.status_code == 201
    release = created.json()["release"]
    assert (release["version"], release["status"], release["in_progress"]) == (2, "pending", True)
    done = client.patch(f"/api/v1/releases/{release['id']}", json={"status": "complete", "metadata": None}).json()
    assert (done["status"], done["stable"], done["in_progress"]) == ("complete", True, False)
    listed = client.get("/api/v1/apps/web-staging/releases", params={"limit": "1"}).json()["releases"]
    assert [r["id"] for r in listed] == [release["id"]]
    history = gql(client, "{ app(name: \"web-staging\") { releasesUnprocessed(first: 5) { nodes { version } } } }")
    assert history["data"]["app"]["releasesUnprocessed"]["nodes"] == [{"version": 2}, {"version": 1}]
    assert client.patch("/api/v1/releases/rel_nope", json={"status": "complete"}).status_code == 404
    assert client.post("/api/v1/releases", json={"app_name": "nope", "image": "x"}).status_code == 404


def test_organization_and_logs_over_rest(client: Client) -> None:
    org = client.get(f"/api/v1/organizations/{SANDBOX_ORG_SLUG}").json()["organization"]
    assert org["slug"] == SANDBOX_ORG_SLUG and org["billing_status"] == "CURRENT"
    assert client.get("/api/v1/organizations/someone-else").status_code == 404
    app = state(client).apps["web-staging"]
    app.log("one more line", "m1", "ams")
    page = client.get("/api/v1/apps/web-staging/logs", params={"next_token": ""}).json()
    assert page["data"][-1]["attributes"]["message"] == "one more line"
    assert page["meta"]["next_token"] == str(len(app.logs))
    later = client.get("/api/v1/apps/web-staging/logs", params={"next_token": page["meta"]["next_token"]})
    assert later.json()["data"] == []
    only_ams = client.get("/api/v1/apps/web-staging/logs", params={"region": "ams"}).json()["data"]
    assert [e["attributes"]["message"] for e in only_ams] == ["one more line"]


@pytest.mark.parametrize(("scheme", "path", "allowed"), [
    ("Bearer", "/graphql", True), ("FlyV1", "/graphql", True), ("FlyV1", "/api/v1/organizations/personal", True),
    ("FlyV1", "/v1/apps/web-staging", False), ("Token", "/graphql", False),
])
def test_flyv1_is_accepted_only_on_graphql_and_rest(server: tuple[ServerThread, list[Starlette]], scheme: str,
                                                    path: str, allowed: bool) -> None:
    with serve(server, scheme) as c:
        response = c.post(path, json={"query": "{ viewer { email } }"}) if path == "/graphql" else c.get(path)
    assert (response.status_code != 401) is allowed, response.text
