"""Keyless CI (issue 5): OIDC id token -> short-lived gateway token, against real loopback issuers.

Every test runs a real gateway (uvicorn) in front of a recording upstream and one or two real
OIDC issuers (`FakeIssuer`: discovery document and JWKS over HTTP, its own keys). A good
exchange yields a token that deploys through the gateway; every refused case asserts the status,
the RFC 6749 error code, and that no token record was added to the store.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli.local import LocalAdmin
from gateway.oidc.exchange import ACCESS_TOKEN_TYPE, GRANT_TYPE, ID_TOKEN_TYPE, JWKS_TTL_S, JWT_TOKEN_TYPE
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.servers import RecordingUpstream, ServerThread, bound_socket
from tests.test_oidc_issuer import AUDIENCE, FakeIssuer, forge_hs256, forge_unsigned, github_claims, new_key

EXCHANGE = "/_gateway/v1/token/exchange"
DEPLOY = "/v1/apps/web-staging/machines"


def github_rules(issuer: str) -> list[dict[str, Any]]:
    return [
        {   # deploys to staging: main branch pushes (or manual runs) of acme/web only, pinned by id
            "name": "web-staging-deploy", "issuer": issuer, "audience": AUDIENCE,
            "claims": {"repository": "acme/web", "repository_id": 123456, "repository_owner_id": "4242",
                       "ref": "refs/heads/main", "event_name": ["push", "workflow_dispatch"]},
            "grants": ["deployer@app:web-staging"], "ttl": "10m"},
        {   # any branch push of acme/web may read the web apps
            "name": "web-read", "issuer": issuer, "audience": AUDIENCE,
            "claims": {"repository": "acme/web", "ref": "refs/heads/*", "event_name": "push"},
            "grants": ["viewer@app:web-*"]},
    ]


def gitlab_rules(issuer: str) -> list[dict[str, Any]]:
    return [{"name": "api-staging", "issuer": issuer, "audience": AUDIENCE,
             "claims": {"project_path": "acme/api", "project_id": 2200, "ref": "main", "ref_protected": True,
                        "pipeline_source": ["push", "web"]},
             "grants": ["deployer@app:api-staging"], "ttl": "5m"}]


@pytest.fixture
def issuer() -> Iterator[FakeIssuer]:
    running = FakeIssuer().start()
    yield running
    running.stop()


@pytest.fixture
def second_issuer() -> Iterator[FakeIssuer]:
    running = FakeIssuer("EC").start()
    yield running
    running.stop()


def start_ci_gateway(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], rules: list[dict[str, Any]],
                     monkeypatch: pytest.MonkeyPatch) -> RunningGateway:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    return start_gateway(tmp_path, *upstream, oidc={"trust": rules}, tokens={"audience": "scopegate"})


@pytest.fixture
def ci(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], issuer: FakeIssuer,
       monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    running = start_ci_gateway(tmp_path, upstream, github_rules(issuer.url), monkeypatch)
    yield running
    running.server.stop()


class FakeClock:
    """Replaces the JWKS cache's monotonic clock, so refetch intervals pass without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exchange(gw: RunningGateway, token: str, **extra: str) -> httpx.Response:
    form = {"grant_type": GRANT_TYPE, "subject_token": token, "subject_token_type": ID_TOKEN_TYPE, **extra}
    with gw.client() as client:
        return client.post(EXCHANGE, data=form)


def record_count(gw: RunningGateway) -> int:
    async def run() -> int:
        admin = LocalAdmin.open(gw.config)
        try:
            return len(await admin.store.records())
        finally:
            await admin.close()

    return asyncio.run(run())


def token_claims(token: str) -> dict[str, Any]:
    payload = token.removeprefix("sgt_").split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def assert_refused(gw: RunningGateway, response: httpx.Response, before: int, status: int, error: str,
                   *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert set(body) == {"error", "error_description"}
    assert response.headers["cache-control"] == "no-store"
    for word in words:
        assert word in body["error_description"], body["error_description"]
    assert record_count(gw) == before, "a refused exchange must not mint a token"
    description: str = body["error_description"]
    return description


def deploy(gw: RunningGateway, token: str) -> httpx.Response:
    with gw.client() as client:
        return client.post(DEPLOY, headers={"Authorization": f"Bearer {token}"},
                           json={"config": {"image": "registry.fly.io/web-staging:deploy-1"}})


# --- the good path ------------------------------------------------------------------------------

def test_exchange_then_deploy_through_the_gateway(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    id_token = issuer.github_token()
    response = exchange(ci, id_token)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600  # both rules match: the shortest ttl (10m) wins
    token = body["access_token"]
    assert token.startswith("sgt_")
    claims = token_claims(token)
    port = issuer.url.rsplit(":", 1)[1]
    assert claims["sub"] == f"oidc:127.0.0.1:{port}:repo:acme/web:ref:refs/heads/main"
    assert claims["grants"] == ["deployer@app:web-staging", "viewer@app:web-*"]  # the union of both rules
    assert claims["exp"] - claims["iat"] == 600
    assert record_count(ci) == before + 1

    reply = deploy(ci, token)
    assert reply.status_code == 200, reply.text
    (received,) = ci.upstream.received
    assert (received.method, received.raw_path) == ("POST", DEPLOY.encode())
    assert received.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]
    assert json.loads(received.body) == {"config": {"image": "registry.fly.io/web-staging:deploy-1"}}

    # Recorded like any token: listed, and revocable.
    ci.revoke(claims["jti"])
    deadline = time.monotonic() + 5
    while deploy(ci, token).status_code != 401:
        assert time.monotonic() < deadline, "a revoked exchanged token kept working"
        time.sleep(0.1)

    # The audit line names the rules and the job, never a token.
    audit = [r for r in ci.audit_records() if r["path"] == EXCHANGE]
    (line,) = audit
    assert line["decision"] == "allow" and line["status"] == 200
    assert line["rule"] == "web-staging-deploy,web-read"
    assert line["jti"] == claims["jti"] and line["sub"] == claims["sub"]
    assert line["claims"]["repository"] == "acme/web"
    assert line["claims"]["ref"] == "refs/heads/main"
    assert line["claims"]["run_id"] == "9876543210"
    assert line["action"] == "gateway:exchange"
    text = ci.audit_text()
    assert id_token not in text and token not in text
    assert id_token.split(".")[2] not in text


def test_a_feature_branch_gets_only_what_its_rules_allow(ci: RunningGateway, issuer: FakeIssuer) -> None:
    response = exchange(ci, issuer.github_token(ref="refs/heads/feature-x", sub="repo:acme/web:ref:refs/heads/x"))
    assert response.status_code == 200, response.text
    assert response.json()["expires_in"] == 900  # web-read's default ttl
    token = response.json()["access_token"]
    assert token_claims(token)["grants"] == ["viewer@app:web-*"]
    assert deploy(ci, token).status_code == 403
    assert ci.upstream.received == []


def test_scope_narrows_the_grants(ci: RunningGateway, issuer: FakeIssuer) -> None:
    response = exchange(ci, issuer.github_token(), scope="viewer@app:web-preview")
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "viewer@app:web-preview"
    assert token_claims(response.json()["access_token"])["grants"] == ["viewer@app:web-preview"]
    # web-staging matches web-*, but in staging: the rule's pattern stays in development.
    staging = exchange(ci, issuer.github_token(), scope="viewer@app:web-staging")
    assert staging.status_code == 400, staging.text
    before = record_count(ci)
    wider = exchange(ci, issuer.github_token(), scope="deployer@app:web-prod")
    assert_refused(ci, wider, before, 400, "invalid_scope", "deployer@app:web-prod")


def test_jwt_subject_token_type_and_es256_gitlab_token(tmp_path: Path, upstream: tuple[RecordingUpstream,
                                                       ServerThread], second_issuer: FakeIssuer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    gw = start_ci_gateway(tmp_path, upstream, gitlab_rules(second_issuer.url), monkeypatch)
    try:
        response = exchange(gw, second_issuer.gitlab_token(), subject_token_type=JWT_TOKEN_TYPE)
        assert response.status_code == 200, response.text
        assert response.json()["expires_in"] == 300
        claims = token_claims(response.json()["access_token"])
        assert claims["grants"] == ["deployer@app:api-staging"]
        assert claims["sub"].endswith(":project_path:acme/api:ref_type:branch:ref:main")
        line = [r for r in gw.audit_records() if r["path"] == EXCHANGE][-1]
        assert line["rule"] == "api-staging"
        assert line["claims"]["pipeline_id"] == "555001" and line["claims"]["project_path"] == "acme/api"
        before = record_count(gw)
        unprotected = exchange(gw, second_issuer.gitlab_token(ref_protected="false"))
        assert_refused(gw, unprotected, before, 401, "invalid_grant", "no trust rule accepts")
    finally:
        gw.server.stop()


# --- refused: claims and audience ---------------------------------------------------------------

def test_wrong_audience(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    response = exchange(ci, issuer.github_token(aud="https://other-service.example"))
    assert_refused(ci, response, before, 401, "invalid_grant", "audience")
    several = exchange(ci, issuer.github_token(aud=[AUDIENCE, "https://other-service.example"]))
    assert_refused(ci, several, before, 401, "invalid_grant", "audience")


def test_wrong_repository(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    response = exchange(ci, issuer.github_token(repository="acme/other", sub="repo:acme/other:ref:refs/heads/main"))
    assert_refused(ci, response, before, 401, "invalid_grant", "no trust rule accepts", "repository=acme/other")
    # A repository renamed and re-created under the old name keeps the name, not the id.
    squatted = exchange(ci, issuer.github_token(repository_id="999999", ref="refs/heads/main",
                                                event_name="workflow_dispatch"))
    assert_refused(ci, squatted, before, 401, "invalid_grant")


def test_pull_requests_from_forks_are_refused(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    # pull_request_target runs in the base repository, on the base branch's ref: only event_name tells.
    target = exchange(ci, issuer.github_token(event_name="pull_request_target", head_ref="evil-fork-branch",
                                              base_ref="main"))
    assert_refused(ci, target, before, 401, "invalid_grant", "event_name=pull_request_target")
    merge = exchange(ci, issuer.github_token(event_name="pull_request", ref="refs/pull/7/merge",
                                             sub="repo:acme/web:pull_request", head_ref="evil-fork-branch"))
    assert_refused(ci, merge, before, 401, "invalid_grant")


def test_wrong_ref(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    response = exchange(ci, issuer.github_token(ref="refs/tags/v1.0", ref_type="tag"))
    assert_refused(ci, response, before, 401, "invalid_grant", "ref=refs/tags/v1.0")
    # The audit line holds each rule's reason; the client only sees its own claims.
    line = [r for r in ci.audit_records() if r["path"] == EXCHANGE][-1]
    assert "claim ref: expected 'refs/heads/main', got 'refs/tags/v1.0'" in line["reason"]
    assert line["decision"] == "deny" and line["status"] == 401


# --- refused: times and replay ------------------------------------------------------------------

def test_expired_token(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    now = int(time.time())
    response = exchange(ci, issuer.github_token(iat=now - 400, nbf=now - 400, exp=now - 100))
    assert_refused(ci, response, before, 401, "invalid_grant", "expired")


def test_token_not_valid_yet(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    now = int(time.time())
    response = exchange(ci, issuer.github_token(nbf=now + 600, exp=now + 900))
    assert_refused(ci, response, before, 401, "invalid_grant", "nbf")


def test_old_token_is_refused_even_before_it_expires(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    now = int(time.time())
    response = exchange(ci, issuer.github_token(iat=now - 1800, nbf=now - 1800, exp=now + 1800))
    assert_refused(ci, response, before, 401, "invalid_grant", "issued 30m ago")


def test_missing_exp_is_refused(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    claims = github_claims(issuer.url)
    del claims["exp"]
    assert_refused(ci, exchange(ci, issuer.sign(claims)), before, 401, "invalid_grant", "no exp")


def test_replay_of_a_used_id_token(ci: RunningGateway, issuer: FakeIssuer) -> None:
    id_token = issuer.github_token()
    assert exchange(ci, id_token).status_code == 200
    before = record_count(ci)
    assert_refused(ci, exchange(ci, id_token), before, 401, "invalid_grant", "already been exchanged")
    # Re-encoding the same claims under a new signature does not help: the jti is what counts.
    same_jti = issuer.sign(github_claims(issuer.url, jti=token_claims(id_token)["jti"]))
    assert_refused(ci, exchange(ci, same_jti), before, 401, "invalid_grant", "already been exchanged")


# --- refused: algorithms and keys ---------------------------------------------------------------

def test_alg_none(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    response = exchange(ci, forge_unsigned(github_claims(issuer.url), issuer.signing.kid or ""))
    assert_refused(ci, response, before, 401, "invalid_grant", "'none'", "RS256")


def test_hs256_signed_with_the_issuers_public_key(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    kid = issuer.signing.kid or ""
    for secret in (issuer.public_pem(), json.dumps(issuer.jwks()["keys"][0]).encode()):
        response = exchange(ci, forge_hs256(github_claims(issuer.url), kid, secret))
        assert_refused(ci, response, before, 401, "invalid_grant", "'HS256'")


def test_bad_signature_and_self_keyed_headers(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    good = issuer.github_token()
    header, _, signature = good.split(".")
    tampered_claims = github_claims(issuer.url, repository="acme/web", ref="refs/heads/main")
    tampered = f"{header}.{base64.urlsafe_b64encode(json.dumps(tampered_claims).encode()).rstrip(b'=').decode()}" \
               f".{signature}"
    assert_refused(ci, exchange(ci, tampered), before, 401, "invalid_grant", "signature does not verify")
    attacker = new_key("EC")  # a key of the attacker's, offered in the header itself
    embedded = issuer.sign(github_claims(issuer.url), attacker, jwk=attacker.as_dict(private=False))
    assert_refused(ci, exchange(ci, embedded), before, 401, "invalid_grant", "jwk")


def test_unknown_kid_after_rotation_is_refetched_once(ci: RunningGateway, issuer: FakeIssuer) -> None:
    assert ci.services.exchanger is not None
    clock = FakeClock()
    ci.services.exchanger.keys.monotonic = clock
    assert exchange(ci, issuer.github_token()).status_code == 200
    assert issuer.jwks_requests == 1

    # Much later (but within the cache's lifetime) the issuer rotates its keys.
    clock.now += 120
    issuer.rotate()
    response = exchange(ci, issuer.github_token())
    assert response.status_code == 200, response.text
    assert issuer.jwks_requests == 2  # refetched once, on the unknown kid
    assert exchange(ci, issuer.github_token()).status_code == 200
    assert issuer.jwks_requests == 2  # ...and cached again

    # A retired key stops verifying once the cached JWKS is refreshed (at most JWKS_TTL_S later).
    before = record_count(ci)
    retired = issuer.signing
    issuer.rotate()
    clock.now += JWKS_TTL_S
    stale = issuer.sign(github_claims(issuer.url), retired)
    assert_refused(ci, exchange(ci, stale), before, 401, "invalid_grant", str(retired.kid))
    assert issuer.jwks_requests == 3


def test_refetches_are_rate_limited_per_issuer(ci: RunningGateway, issuer: FakeIssuer) -> None:
    assert ci.services.exchanger is not None
    clock = FakeClock()
    ci.services.exchanger.keys.monotonic = clock
    assert exchange(ci, issuer.github_token()).status_code == 200
    # Made-up kids must not make the gateway hammer the issuer.
    before = record_count(ci)
    for n in range(5):
        forged = issuer.sign(github_claims(issuer.url), kid=f"made-up-{n}")
        assert_refused(ci, exchange(ci, forged), before, 401, "invalid_grant", "made-up", "retry in")
    assert issuer.jwks_requests == 1
    # A rotation right after a fetch waits for the interval, then works with one refetch.
    issuer.rotate("EC")
    assert_refused(ci, exchange(ci, issuer.github_token()), before, 401, "invalid_grant", "retry in")
    assert issuer.jwks_requests == 1
    clock.now += 31
    assert exchange(ci, issuer.github_token()).status_code == 200
    assert issuer.jwks_requests == 2


def test_same_kid_from_another_issuer_is_refused(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
                                                  issuer: FakeIssuer, monkeypatch: pytest.MonkeyPatch) -> None:
    other = FakeIssuer(kid=issuer.signing.kid).start()  # a different key under the very same kid
    try:
        rules = [*github_rules(issuer.url),
                 {"name": "other-read", "issuer": other.url, "audience": AUDIENCE, "claims": {"repository": "x/y"},
                  "grants": ["viewer@app:other"]}]
        gw = start_ci_gateway(tmp_path, upstream, rules, monkeypatch)
        try:
            # Both issuers' key sets are fetched and cached.
            assert exchange(gw, issuer.github_token()).status_code == 200
            assert exchange(gw, other.sign(github_claims(other.url, repository="x/y"))).status_code == 200
            before = record_count(gw)
            # The other issuer signs a token that claims to come from the first one.
            spoofed = other.sign(github_claims(issuer.url))
            assert spoofed.split(".")[0] == issuer.sign(github_claims(issuer.url)).split(".")[0]  # same alg, same kid
            assert_refused(gw, exchange(gw, spoofed), before, 401, "invalid_grant", "signature does not verify")
            # A kid only the other issuer publishes is unknown to the first.
            only_other = other.rotate(kid="only-at-other", keep_old=True)
            assert gw.services.exchanger is not None
            gw.services.exchanger.keys.monotonic = lambda: time.monotonic() + 3600  # allow a refetch
            assert_refused(gw, exchange(gw, other.sign(github_claims(issuer.url), only_other)), before, 401,
                           "invalid_grant", "only-at-other")
            assert record_count(gw) == before
        finally:
            gw.server.stop()
    finally:
        other.stop()


def test_untrusted_issuer(ci: RunningGateway) -> None:
    stranger = FakeIssuer().start()
    try:
        before = record_count(ci)
        response = exchange(ci, stranger.github_token())
        assert_refused(ci, response, before, 401, "invalid_grant", "not trusted")
        assert stranger.discovery_requests == 0 and stranger.jwks_requests == 0
    finally:
        stranger.stop()


# --- refused: the issuer's keys cannot be fetched -------------------------------------------------

def test_jwks_endpoint_down(ci: RunningGateway, issuer: FakeIssuer) -> None:
    assert ci.services.exchanger is not None
    clock = FakeClock()
    ci.services.exchanger.keys.monotonic = clock
    issuer.jwks_status = 503
    before = record_count(ci)
    response = exchange(ci, issuer.github_token())
    description = assert_refused(ci, response, before, 503, "temporarily_unavailable", "could not be fetched",
                                 "HTTP 503", "nothing was minted")
    assert issuer.url in description
    assert int(response.headers["retry-after"]) >= 1
    # Retries inside the interval do not reach the issuer; after it, the keys come back.
    assert_refused(ci, exchange(ci, issuer.github_token()), before, 503, "temporarily_unavailable")
    assert issuer.jwks_requests == 1
    issuer.jwks_status = 200
    clock.now += 31
    assert exchange(ci, issuer.github_token()).status_code == 200
    # Once the cache is stale and the issuer is down again, the exchange fails closed.
    issuer.jwks_status = 500
    clock.now += 3600
    before = record_count(ci)
    assert_refused(ci, exchange(ci, issuer.github_token()), before, 503, "temporarily_unavailable", "HTTP 500")


def test_jwks_unreachable(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], issuer: FakeIssuer,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    closed = bound_socket()
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    rules = github_rules(issuer.url)
    for rule in rules:
        rule["jwks_url"] = f"http://127.0.0.1:{port}/keys"
    gw = start_ci_gateway(tmp_path, upstream, rules, monkeypatch)
    try:
        before = record_count(gw)
        response = exchange(gw, issuer.github_token())
        assert_refused(gw, response, before, 503, "temporarily_unavailable", "unreachable", f":{port}/keys")
        assert issuer.discovery_requests == 0  # a configured jwks_url skips discovery
    finally:
        gw.server.stop()


def test_issuer_stopped_entirely(ci: RunningGateway, issuer: FakeIssuer) -> None:
    token = issuer.github_token()
    issuer.stop()
    before = record_count(ci)
    assert_refused(ci, exchange(ci, token), before, 503, "temporarily_unavailable", "discovery document")


# --- the request itself -------------------------------------------------------------------------

def test_malformed_requests(ci: RunningGateway, issuer: FakeIssuer) -> None:
    before = record_count(ci)
    token = issuer.github_token()
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
        ({"grant_type": ""}, 400, "invalid_request"),
        ({"subject_token": ""}, 400, "invalid_request"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, 400, "invalid_request"),
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"}, 400, "invalid_request"),
        ({"actor_token": token, "actor_token_type": ID_TOKEN_TYPE}, 400, "invalid_request"),
        ({"audience": "https://elsewhere.example"}, 400, "invalid_target"),
        ({"resource": "https://elsewhere.example/api"}, 400, "invalid_target"),
        ({"subject_token": "not-a-jwt"}, 400, "invalid_request"),
    ]
    for extra, status, error in cases:
        assert_refused(ci, exchange(ci, token, **extra), before, status, error)
    with ci.client() as client:
        as_json = client.post(EXCHANGE, json={"grant_type": GRANT_TYPE, "subject_token": token,
                                              "subject_token_type": ID_TOKEN_TYPE})
        assert_refused(ci, as_json, before, 400, "invalid_request", "x-www-form-urlencoded")
        in_query = client.post(EXCHANGE, params={"subject_token": token},
                               data={"grant_type": GRANT_TYPE, "subject_token_type": ID_TOKEN_TYPE})
        assert_refused(ci, in_query, before, 400, "invalid_request", "query string")
        doubled = client.post(EXCHANGE, content=f"grant_type={GRANT_TYPE}&subject_token={token}&subject_token={token}"
                              f"&subject_token_type={ID_TOKEN_TYPE}",
                              headers={"content-type": "application/x-www-form-urlencoded"})
        assert_refused(ci, doubled, before, 400, "invalid_request", "more than once")
        assert client.get(EXCHANGE).status_code == 405
    # The audience parameter may name the gateway itself.
    assert exchange(ci, token, audience="scopegate").status_code == 200


def test_no_trust_rules_means_no_exchange(gateway: RunningGateway) -> None:
    claims = github_claims("https://token.actions.githubusercontent.com")
    before = record_count(gateway)
    response = exchange(gateway, forge_unsigned(claims, "k"))
    assert_refused(gateway, response, before, 401, "invalid_grant", "trusts no OIDC issuer")


def test_the_exchange_is_in_the_admin_openapi_document(ci: RunningGateway) -> None:
    with ci.client() as client:
        document = client.get("/_gateway/v1/openapi.json").json()
    operation = document["paths"][EXCHANGE]["post"]
    assert operation["security"] == []
    assert "application/x-www-form-urlencoded" in operation["requestBody"]["content"]


def test_malformed_subject_tokens_never_cause_a_server_error(ci: RunningGateway, issuer: FakeIssuer) -> None:
    def part(document: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()

    good = issuer.github_token()
    header, payload, signature = good.split(".")
    kid = issuer.signing.kid
    hostile = [
        "a.b.c", "...", "a..c", f"{header}.{payload}", f"{header}.{payload}.{signature}.x", "\u00e9.\u00e9.\u00e9",
        f"{part([1, 2])}.{payload}.{signature}", f"{header}.{part([1, 2])}.{signature}",
        f"{part({'alg': 'RS256', 'kid': 7})}.{payload}.{signature}",
        f"{part({'alg': ['RS256'], 'kid': kid})}.{payload}.{signature}",
        f"{part({'alg': 'RS256', 'kid': kid, 'crit': ['exp']})}.{payload}.{signature}",
        f"{part({'alg': 'RS256', 'kid': kid, 'x5u': 'https://evil.example/cert'})}.{payload}.{signature}",
        f"{part({'alg': 'RS256', 'kid': kid})}.{part({'iss': [issuer.url]})}.{signature}",
        f"{part({'alg': 'RS256', 'kid': kid})}.{part({'iss': issuer.url, 'exp': 'never'})}.{signature}",
        f"{header}.{payload}.{signature[:-4]}", f"{header}.{payload}.",
        f"{part({'alg': 'RS256', 'kid': 'x' * 2000})}.{payload}.{signature}",
        f"{header}.{payload}.{'A' * 5000}",
    ]
    before = record_count(ci)
    for token in hostile:
        response = exchange(ci, token)
        assert response.status_code in (400, 401), (token[:80], response.status_code, response.text)
        assert response.json()["error"] in ("invalid_request", "invalid_grant"), response.text
    assert record_count(ci) == before
    # The good token still works afterwards (nothing above consumed it).
    assert exchange(ci, good).status_code == 200
