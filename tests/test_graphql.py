"""The GraphQL surface (`POST /graphql`) through a real gateway in front of a recording upstream.

Every refusal case also checks that the upstream received nothing; every allowed case that it
received exactly the client's body with the gateway's credential instead of the client's token.
The documents are Fly's real schema's (validated by the gateway with graphql-core).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Config, build_config
from gateway.core.policy import PolicyEngine
from gateway.core.rules import check_cross_references
from gateway.errors import ConfigError
from gateway.services import produced_actions
from gateway.surfaces.graphql import documents
from gateway.surfaces.graphql.operations import OperationMap
from gateway.surfaces.graphql.surface import load_schema
from tests.conftest import CREDENTIAL_ENV, REPO, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.servers import RecordingUpstream, Reply, ServerThread

ORG = "acme"
RESOLVE_IMAGE = ("query ($appName: String!, $imageRef: String!) { app(name: $appName) { id image(ref: $imageRef) "
                 "{ id digest ref compressedSize: compressedSizeFull manifest } } }")
SET_SECRETS = ("mutation($input: SetSecretsInput!) { setSecrets(input: $input) { release { id version reason "
               "description user { id email name } evaluationId createdAt } } }")


@pytest.fixture(scope="module")
def gql(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    folder = tmp_path_factory.mktemp("graphql")
    recorder = RecordingUpstream()
    server = ServerThread(recorder).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
        running = start_gateway(folder, recorder, server, upstream={"graphql_url": f"{server.url}/graphql",
                                                                   "org_slug": ORG})
    yield running
    running.server.stop()
    server.stop()


@pytest.fixture(scope="module")
def deployer(gql: RunningGateway) -> str:
    return gql.mint("deployer@app:web-staging", name="web-ci")


@pytest.fixture(autouse=True)
def _clean(gql: RunningGateway) -> None:
    gql.upstream.clear()
    gql.upstream.reply = Reply(body=b'{"data":{}}')


def post(gql: RunningGateway, token: str | None, payload: Any, *, raw: bytes | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    content = raw if raw is not None else json.dumps(payload).encode()
    with gql.client() as client:
        return client.post("/graphql", content=content, headers=headers)


def refused(response: httpx.Response, gql: RunningGateway, status: int = 403, code: str = "FORBIDDEN") -> str:
    # Refusals travel as HTTP 200 (fly-go's GraphQL client reads errors only from a 200); the refusal's
    # status is in the body and the audit record.
    assert response.status_code == 200, response.text
    body = response.json()
    (error,) = body["errors"]
    assert error["extensions"]["status"] == status and gql.audit_records()[-1]["status"] == status
    assert body["error"] != "" and gql.audit_records()[-1]["decision"] == "deny"
    assert error["extensions"]["code"] == code and error["extensions"]["request_id"] == body["request_id"]
    assert error["message"] == body["message"] and body["request_id"] == response.headers["x-request-id"]
    assert gql.upstream.received == [], "the upstream must receive nothing for a refusal"
    return str(body["message"])


def forwarded(response: httpx.Response, gql: RunningGateway, token: str, body: bytes) -> None:
    assert response.status_code == 200, response.text
    (got,) = gql.upstream.received
    assert got.method == "POST" and got.raw_path == b"/graphql" and got.body == body
    assert got.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]
    assert token not in repr(got.headers)


# --- allowed ---------------------------------------------------------------------------------------

def test_flyctls_resolve_image_for_its_own_app_is_forwarded_byte_for_byte(gql: RunningGateway, deployer: str) -> None:
    payload = {"query": RESOLVE_IMAGE, "variables": {"appName": "web-staging",
                                                     "imageRef": "registry.fly.io/web-staging:deployment-1"}}
    body = json.dumps(payload).encode()
    forwarded(post(gql, deployer, payload, raw=body), gql, deployer, body)
    record = gql.audit_records()[-1]
    assert (record["decision"], record["action"], record["app"], record["path"]) == \
        ("allow", "apps:read", "web-staging", "/graphql")


def test_set_secrets_with_the_app_name_in_input_app_id_is_allowed_for_staging(gql: RunningGateway,
                                                                              deployer: str) -> None:
    payload = {"query": SET_SECRETS, "variables": {"input": {"appId": "web-staging",
                                                             "secrets": [{"key": "A", "value": "b"}]}}}
    body = json.dumps(payload).encode()
    forwarded(post(gql, deployer, payload, raw=body), gql, deployer, body)
    assert gql.audit_records()[-1]["action"] == "secrets:write"


def test_a_batch_of_allowed_requests_is_forwarded(gql: RunningGateway, deployer: str) -> None:
    one = {"query": "query { app(name: \"web-staging\") { id name } }"}
    body = json.dumps([one, one]).encode()
    forwarded(post(gql, deployer, None, raw=body), gql, deployer, body)


def test_a_repeated_document_is_parsed_once(gql: RunningGateway, deployer: str) -> None:
    analyzer = gql.services.surfaces[0].analyzer  # type: ignore[attr-defined]
    payload = {"query": "query Repeated($n: String!) { app(name: $n) { id status } }",
               "variables": {"n": "web-staging"}}
    assert post(gql, deployer, payload).status_code == 200
    parsed = analyzer.parsed
    for _ in range(3):
        assert post(gql, deployer, payload).status_code == 200
    assert analyzer.parsed == parsed


def test_a_repeated_body_is_resolved_once_and_decided_per_token(gql: RunningGateway, deployer: str) -> None:
    surface = gql.services.surfaces[0]
    payload = {"query": "query Again($n: String!) { app(name: $n) { id status } }", "variables": {"n": "web-staging"}}
    body = json.dumps(payload).encode()
    forwarded(post(gql, deployer, None, raw=body), gql, deployer, body)
    resolution = surface.resolve(body)  # type: ignore[attr-defined]
    assert surface.resolve(body) is resolution  # type: ignore[attr-defined]
    gql.upstream.clear()
    forwarded(post(gql, deployer, None, raw=body), gql, deployer, body)
    # The same bytes from a token without the app: its own decision, not the first token's.
    other = gql.mint("deployer@app:web-prod", name="prod-ci")
    gql.upstream.clear()
    assert "web-staging" in refused(post(gql, other, None, raw=body), gql)
    # The same document with other variables is another body: resolved (and refused) on its own.
    assert "web-prod" in refused(post(gql, deployer, {**payload, "variables": {"n": "web-prod"}}), gql)
    # A reloaded operation map resolves every body anew.
    surface.load().install()
    assert surface.resolve(body) is not resolution  # type: ignore[attr-defined]


def test_bodies_that_differ_only_in_an_unused_variable_share_one_decision_and_big_ones_are_not_kept(
        gql: RunningGateway, deployer: str) -> None:
    """A hostile client varying an unused variable must not grow the gateway's memory per request:
    large resolutions are not kept, and the decision cache holds one entry per documents + checks."""
    surface = gql.services.surfaces[0]
    decisions = gql.services.authorizer.decisions
    fields = " ".join(f"a{i}: app(name: $n) {{ id }}" for i in range(20))  # 20 checks: over the kept size
    query = f"query Wide($n: String!) {{ {fields} }}"  # `nonce` below is a variable nothing declares
    before = len(decisions.entries)
    for nonce in range(5):
        body = json.dumps({"query": query, "variables": {"n": "web-staging", "nonce": str(nonce)}}).encode()
        gql.upstream.clear()
        forwarded(post(gql, deployer, None, raw=body), gql, deployer, body)
        assert hashlib.sha256(body).digest() not in surface._resolved  # type: ignore[attr-defined]
    assert len(decisions.entries) - before == 1
    small = {"query": "query Small($n: String!) { app(name: $n) { id } }"}
    for nonce in range(3):
        body = json.dumps({**small, "variables": {"n": "web-staging", "nonce": str(nonce)}}).encode()
        assert post(gql, deployer, None, raw=body).status_code == 200
        assert hashlib.sha256(body).digest() in surface._resolved  # type: ignore[attr-defined]
    assert len(decisions.entries) - before == 2


# --- the app, however it is spelled ------------------------------------------------------------------

@pytest.mark.parametrize(("name", "payload"), [
    ("literal", {"query": "{ app(name: \"web-prod\") { id } }"}),
    ("variable", {"query": "query ($n: String!) { app(name: $n) { id } }", "variables": {"n": "web-prod"}}),
    ("variable default", {"query": "query ($n: String = \"web-prod\") { app(name: $n) { id } }"}),
    ("alias", {"query": "{ mine: app(name: \"web-staging\") { id } theirs: app(name: \"web-prod\") { id } }"}),
    ("fragment", {"query": "{ ...F } fragment F on Queries { app(name: \"web-prod\") { id } }"}),
    ("inline fragment", {"query": "{ ... on Queries { app(name: \"web-prod\") { id } } }"}),
    ("second operation", {"query": "query A { app(name: \"web-staging\") { id } } "
                                   "query B { app(name: \"web-prod\") { id } }", "operationName": "A"}),
    ("app by id", {"query": "{ app(id: \"web-prod\") { id } }"}),
    ("input literal", {"query": "mutation { setSecrets(input: {appId: \"web-prod\", secrets: []}) { app { id } } }"}),
    ("input variable", {"query": SET_SECRETS, "variables": {"input": {"appId": "web-prod", "secrets": []}}}),
    ("input field variable", {"query": "mutation ($a: ID!) { setSecrets(input: {appId: $a, secrets: []}) "
                                       "{ app { id } } }", "variables": {"a": "web-prod"}}),
    ("bluegreen", {"query": "query ($n: String!) { canPerformBluegreenDeployment(name: $n) }",
                   "variables": {"n": "web-prod"}}),
])
def test_another_app_is_refused_however_it_is_named(gql: RunningGateway, deployer: str, name: str,
                                                    payload: dict[str, Any]) -> None:
    message = refused(post(gql, deployer, payload), gql)
    assert "web-prod" in message, message


def test_a_batch_with_one_other_app_is_refused_whole(gql: RunningGateway, deployer: str) -> None:
    mine, theirs = ({"query": f"{{ app(name: \"{app}\") {{ id }} }}"} for app in ("web-staging", "web-prod"))
    refused(post(gql, deployer, [mine, theirs]), gql)


def test_deployers_still_cannot_write_production_secrets(gql: RunningGateway) -> None:
    token = gql.mint("deployer@app:web*-prod")
    payload = {"query": SET_SECRETS, "variables": {"input": {"appId": "web-prod", "secrets": []}}}
    message = refused(post(gql, token, payload), gql)
    assert "secrets:write" in message and "production" in message


@pytest.mark.parametrize(("name", "payload", "why"), [
    ("name and id", {"query": "{ app(name: \"web-staging\", id: \"web-prod\") { id } }"}, "exactly one"),
    ("no app", {"query": "{ app { id } }"}, "exactly one"),
    ("number", {"query": "query ($n: String) { app(name: $n) { id } }", "variables": {"n": 5}},
     "String cannot represent a non string value"),
    ("not a name", {"query": "{ app(name: \"Web_Prod\") { id } }"}, "app name"),
])
def test_an_unreadable_app_argument_is_a_400(gql: RunningGateway, deployer: str, name: str,
                                             payload: dict[str, Any], why: str) -> None:
    assert why in refused(post(gql, deployer, payload), gql, 400, "BAD_REQUEST")


# --- what a document may reach ------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "query", "why"), [
    ("organization apps", "{ app(name: \"web-staging\") { organization { apps { nodes { name } } } } }",
     "Organization.apps"),
    ("org tokens", "{ app(name: \"web-staging\") { organization { limitedAccessTokens { nodes { id } } } } }",
     "Organization.limitedAccessTokens"),
    ("fragment traversal", "{ app(name: \"web-staging\") { ...O } } fragment O on App "
                           "{ organization { wireGuardPeers { nodes { name } } } }", "Organization.wireGuardPeers"),
    ("node", "{ node(id: \"QXBwLzE=\") { id } }", "global id"),
    ("nodes", "{ nodes(ids: [\"QXBwLzE=\"]) { id } }", "global ids"),
    ("viewer", "{ viewer { ... on User { email } } }", "always denied"),
    ("introspection", "{ __schema { types { name } } }", "not served"),
    ("org by slug", "{ organization(slug: \"other-org\") { id } }", "not the one this gateway serves"),
    ("wireguard", "mutation { addWireGuardPeer(input: {organizationId: \"o\", region: \"iad\", name: \"n\", "
                  "pubkey: \"k\"}) { peerip } }", "--image"),
    ("fly token", "mutation { createLimitedAccessToken(input: {organizationId: \"o\", name: \"n\", profile: \"p\"}) "
                  "{ limitedAccessToken { token } } }", "attenuate"),
])
def test_traversal_and_org_level_reach_are_refused(gql: RunningGateway, deployer: str, name: str, query: str,
                                                   why: str) -> None:
    assert why in refused(post(gql, deployer, {"query": query}), gql)


def test_organizations_are_cut_to_the_gateways_own(gql: RunningGateway, deployer: str) -> None:
    answer = {"data": {"orgs": {"nodes": [{"id": "1", "slug": ORG, "name": "Acme"},
                                          {"id": "2", "slug": "other", "name": "Other Corp"}, {"id": "3"}]}}}
    gql.upstream.reply = Reply(body=json.dumps(answer).encode())
    response = post(gql, deployer, {"query": "{ orgs: organizations(admin: true) { nodes { id slug name } } }"})
    assert response.status_code == 200
    assert response.json()["data"]["orgs"]["nodes"] == [{"id": "1", "slug": ORG, "name": "Acme"}]
    assert "Other Corp" not in response.text


# --- hostile and malformed documents, refused before anything is forwarded -------------------------------

def _timed(gql: RunningGateway, token: str, query: str) -> tuple[str, float]:
    started = time.perf_counter()
    message = refused(post(gql, token, {"query": query}), gql, 400, "BAD_REQUEST")
    return message, time.perf_counter() - started


def test_an_alias_bomb_is_refused_before_validation(gql: RunningGateway, deployer: str) -> None:
    query = "{ " + " ".join(f"a{i}: app(name: \"web-staging\") {{ id }}" for i in range(3000)) + " }"
    message, _ = _timed(gql, deployer, query[:documents.MAX_DOCUMENT_BYTES - 10] + " }")
    assert "aliases" in message or "tokens" in message or "longer" in message


def test_a_fragment_bomb_is_refused_without_expanding_it(gql: RunningGateway, deployer: str) -> None:
    levels = ["fragment F0 on App { id name }"] + [f"fragment F{i} on App {{ ...F{i - 1} ...F{i - 1} }}"
                                                    for i in range(1, 30)]
    query = "{ app(name: \"web-staging\") { ...F29 } } " + " ".join(levels)
    message, _ = _timed(gql, deployer, query)
    assert "selects more than" in message


@pytest.mark.parametrize(("name", "query", "why"), [
    ("depth", "{ app(name: \"web-staging\") { " + "a { " * 14 + "id" + " }" * 15 + " }", "deeper"),
    ("malformed", "{ app(name: \"web-staging\") { id }", "does not parse"),
    ("unknown field", "{ app(name: \"web-staging\") { noSuchField } }", "not valid against Fly's schema"),
    ("wrong argument type", "{ app(name: 5) { id } }", "not valid"),
    ("too long", "{ app(name: \"web-staging\") { id } }" + " " * documents.MAX_DOCUMENT_BYTES, "longer"),
])
def test_malformed_and_oversized_documents_are_400(gql: RunningGateway, deployer: str, name: str, query: str,
                                                   why: str) -> None:
    message, _ = _timed(gql, deployer, query)
    assert why in message, message


@pytest.mark.parametrize(("name", "raw", "why"), [
    ("duplicate key", b'{"query": "{ app(name: \\"web-staging\\") { id } }", "query": "{ app(name: \\"web-prod\\") '
                      b'{ id } }"}', "twice"),
    ("persisted query", b'{"extensions": {"persistedQuery": {"sha256Hash": "abc"}}}', "query"),
    ("extra key", b'{"query": "{ app(name: \\"web-staging\\") { id } }", "extensions": {}}', "unknown"),
    ("not json", b"query { app }", "not valid JSON"),
    ("variables list", b'{"query": "{ app(name: \\"web-staging\\") { id } }", "variables": [1]}', "object"),
    ("empty batch", b"[]", "batch"),
])
def test_malformed_requests_are_400(gql: RunningGateway, deployer: str, name: str, raw: bytes, why: str) -> None:
    assert why in refused(post(gql, deployer, None, raw=raw), gql, 400, "BAD_REQUEST")


def test_no_token_is_401_in_the_graphql_shape(gql: RunningGateway) -> None:
    refused(post(gql, None, {"query": "{ app(name: \"web-staging\") { id } }"}), gql, 401, "UNAUTHORIZED")


def test_get_and_query_strings_are_refused(gql: RunningGateway, deployer: str) -> None:
    with gql.client() as client:
        got = client.get("/graphql", params={"query": "{ app(name: \"web-staging\") { id } }"},
                         headers={"Authorization": f"Bearer {deployer}"})
    refused(got, gql, 400, "BAD_REQUEST")


@pytest.mark.parametrize(("text", "why"), [
    ("query:\n  app: {action: apps:read, app: \"arg:nmae\"}\n", "nmae"),
    ("query:\n  appp: {action: apps:read, app: \"arg:name\"}\n", "no query field 'appp'"),
    ("types:\n  App: [id, organisation]\n", "organisation"),
    ("mutation:\n  setSecrets: {action: sekrets:write, app: \"input:appId\"}\n", "sekrets:write"),
    ("query:\n  organization: {action: apps:read, app: \"org:slug\"}\n", "platform:read"),
])
def test_the_operation_map_is_checked_against_the_schema_and_the_policy(tmp_path: Path, text: str, why: str) -> None:
    broken = tmp_path / "map.yaml"
    broken.write_text(text)
    with pytest.raises(ConfigError, match=why):
        produced = OperationMap.load(broken, load_schema()).produced_actions()
        others = [p for p in produced_actions(shipped_config()) if not p.source.startswith(str(MAP))]
        check_cross_references(PolicyEngine(REPO / "policies/model.conf", REPO / "policies/policy.csv"),
                               [*produced, *others])


def shipped_config() -> Config:
    return build_config({}, base_dir=REPO, source="(test)", environ={})


MAP = REPO / "policies/routes/fly-graphql.yaml"


def test_the_shipped_map_loads_and_matches_the_policy() -> None:
    produced = OperationMap.load(MAP, load_schema()).produced_actions()
    check_cross_references(PolicyEngine(REPO / "policies/model.conf", REPO / "policies/policy.csv"),
                           produced_actions(shipped_config()))
    assert {"apps:read", "secrets:write", "secrets:list"} <= {p.action for p in produced}


def test_an_unreachable_graphql_upstream_is_502(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = start_gateway(tmp_path, *upstream, upstream={"graphql_url": "http://127.0.0.1:9/graphql"})
    try:
        token = running.mint("viewer@app:web-staging")
        with running.client() as client:
            response = client.post("/graphql", json={"query": "{ app(name: \"web-staging\") { id } }"},
                                   headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert response.json()["errors"][0]["extensions"] == {
            "code": "UPSTREAM_UNAVAILABLE", "status": 502, "request_id": response.headers["x-request-id"]}
    finally:
        running.server.stop()


FLYCTL_DOCUMENTS = sorted((REPO / "tests/contract/flyctl_documents").glob("*.graphql"))


@pytest.mark.parametrize("path", FLYCTL_DOCUMENTS, ids=lambda p: p.stem)
def test_every_document_flyctl_sends_is_served(gql: RunningGateway, deployer: str, path: Path) -> None:
    """The documents the real flyctl sent (recorded by tests/contract/test_flyctl_sandbox.py) pass
    the map's root fields and traversal rule for a deployer of the app they name."""
    query = path.read_text()
    variables = {"appName": "web-staging", "imageRef": "registry.fly.io/web-staging:v2", "limit": 5,
                 "image": "flyio/postgres", "flyVersion": "v1", "admin": False}
    document = documents.DocumentAnalyzer(load_schema(), OperationMap.load(
        REPO / "policies/routes/fly-graphql.yaml", load_schema())).analyze(query)
    used = {name for use in document.uses for name in _variables_of(query) if name in variables}
    body = json.dumps({"query": query, "variables": {k: variables[k] for k in used}}).encode()
    gql.upstream.reply = Reply(body=b'{"data":{"organizations":{"nodes":[]}}}')
    forwarded(post(gql, deployer, None, raw=body), gql, deployer, body)


def _variables_of(query: str) -> set[str]:
    import re

    return set(re.findall(r"\$([A-Za-z_]+)", query))


def test_flyctls_documents_were_recorded() -> None:
    assert len(FLYCTL_DOCUMENTS) >= 8  # tests/contract/flyctl_documents: one file per document flyctl sent


def test_a_token_flood_is_refused_before_parsing(gql: RunningGateway, deployer: str) -> None:
    message, _ = _timed(gql, deployer, "{ app(name: \"web-staging\") { id " + "id " * 1200 + "} }")
    assert f"more than {documents.MAX_TOKENS} tokens" in message


def test_comments_and_hashes_in_strings_are_not_tokens(gql: RunningGateway, deployer: str) -> None:
    query = "# a comment { { {\n" * 150 + "{ app(name: \"web-staging\") { id image(ref: \"x:1#{{{\") { id } } }"
    body = json.dumps({"query": query}).encode()
    forwarded(post(gql, deployer, None, raw=body), gql, deployer, body)


# --- the red team's findings, each a regression test -------------------------------------------------

@pytest.mark.parametrize(("name", "query", "why"), [
    ("internalId beside name", "{ app(name: \"web-staging\", internalId: \"prod-internal-id\") { id } }", "internalId"),
    ("key beside name", "{ app(name: \"web-staging\", key: \"web-prod\") { id } }", "key"),
    ("org id beside slug", "{ organization(slug: \"acme\", id: \"other-org-id\") { id } }", "id"),
    ("another app's image", "{ app(name: \"web-staging\") { image(ref: \"registry.fly.io/web-prod:deployment-01\") "
                            "{ manifest } } }", "registry.fly.io/web-prod"),
    ("lookup by id under the app", "{ app(name: \"web-staging\") { machine(id: \"m-of-web-prod\") { id } } }",
     "App.machine"),
    ("private image details", "{ latestImageDetails(image: \"registry.fly.io/web-prod:latest\") { digest } }",
     "registry.fly.io/web-prod"),
    ("ip in another org", "mutation { allocateIpAddress(input: {appId: \"web-staging\", type: private_v6, "
                          "organizationId: \"other-org-id\"}) { ipAddress { id } } }", "organizationId"),
    ("organizations under an alias", "{ organizations { nodes { slug } all: nodes { id slug name } } }", "aliases"),
    ("organizations in a fragment", "{ organizations { ... on OrganizationConnection { nodes { slug name } } } }",
     "fragments"),
    ("organizations without slug", "{ organizations { nodes { id name } } }", "slug"),
    ("total under an alias", "{ organizations { nodes { slug } n: totalCount } }", "aliases"),
])
def test_what_a_document_reaches_beyond_its_root_fields_is_refused(gql: RunningGateway, deployer: str, name: str,
                                                                   query: str, why: str) -> None:
    assert why in refused(post(gql, deployer, {"query": query}), gql)


def test_the_tokens_own_images_and_public_ones_are_read(gql: RunningGateway, deployer: str) -> None:
    for ref in ("registry.fly.io/web-staging:deployment-02", "registry.fly.io/web-staging@sha256:" + "a" * 64,
                "docker.io/library/nginx:latest", "nginx"):
        gql.upstream.clear()
        payload = {"query": RESOLVE_IMAGE, "variables": {"appName": "web-staging", "imageRef": ref}}
        body = json.dumps(payload).encode()
        forwarded(post(gql, deployer, None, raw=body), gql, deployer, body)


@pytest.mark.parametrize(("name", "raw", "content_type", "why"), [
    ("form content type", b'{"query":"{ app(name: \\"web-staging\\") { id } }"}', "application/x-www-form-urlencoded",
     "application/json"),
    ("text content type", b'{"query":"{ app(name: \\"web-staging\\") { id } }"}', "text/plain", "application/json"),
    ("latin-1 charset", b'{"query":"{ app(name: \\"web-staging\\") { id } }"}', "application/json; charset=latin-1",
     "application/json"),
    ("lone surrogate", b'{"query":"{ app(name: \\"web-staging\\") { id } }","variables":{"a":"\\ud800\\u0022"}}',
     "application/json", "lone surrogate"),
    ("deep nesting", b'{"query":"{ app(name: \\"web-staging\\") { id } }","variables":{"a":' + b"[" * 100_000
     + b"]" * 100_000 + b"}}", "application/json", "too deeply"),
    ("variables a string", b'{"query":"{ app(name: \\"web-staging\\") { id } }","variables":""}', "application/json",
     "object"),
    ("variables false", b'{"query":"{ app(name: \\"web-staging\\") { id } }","variables":false}', "application/json",
     "object"),
    ("unknown input field", b'{"query":"mutation ($i: SetSecretsInput!) { setSecrets(input: $i) { app { id } } }",'
                            b'"variables":{"i":{"appId":"web-staging","secrets":[],"APPID":"web-prod"}}}',
     "application/json", "do not fit"),
])
def test_bodies_the_upstream_could_read_otherwise_are_refused(gql: RunningGateway, deployer: str, name: str,
                                                               raw: bytes, content_type: str, why: str) -> None:
    with gql.client() as client:
        response = client.post("/graphql", content=raw, headers={"Content-Type": content_type,
                                                                  "Authorization": f"Bearer {deployer}"})
    assert why in refused(response, gql, 400, "BAD_REQUEST")


def test_an_unterminated_string_flood_is_refused(gql: RunningGateway, deployer: str) -> None:
    # Quadratic in the first pre-count (every quote rescanned to the end); now one linear pass.
    message, _ = _timed(gql, deployer, "#x\n\"" + "\\\"" * 5000)
    assert "tokens" in message or "does not parse" in message


def test_the_forwarded_content_type_is_the_gateways(gql: RunningGateway, deployer: str) -> None:
    with gql.client() as client:
        client.post("/graphql", content=b'{"query":"{ app(name: \\"web-staging\\") { id } }"}',
                    headers={"Content-Type": "application/json; charset=utf-8", "Authorization": f"Bearer {deployer}"})
    (got,) = gql.upstream.received
    assert got.header("content-type") == ["application/json"]


def test_a_batch_audits_every_field_and_app(gql: RunningGateway) -> None:
    admin = gql.mint("admin@app:web-*")
    batch = [{"query": "{ app(name: \"web-staging\") { id } }"},
             {"query": "mutation { deleteApp(appId: \"web-prod\") { organization { id } } }"}]
    assert post(gql, admin, batch).status_code == 200
    record = gql.audit_records()[-1]
    assert record["graphql"] == [
        {"field": "query app", "action": "apps:read", "app": "web-staging", "env": "staging"},
        {"field": "mutation deleteApp", "action": "apps:delete", "app": "web-prod", "env": "production"}]
