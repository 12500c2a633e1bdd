"""Issue 15, classes 1, 2 and 8: tokens derived from other tokens, tried as an attacker would.

1. A derived token never outlives its parent's revocation: many `attenuate` calls race one
   revocation made outside the gateway (as the CLI or another instance makes it, so the gateway
   learns of it only from the change feed); afterwards every child is 401, on both stores, and no
   call that started after the revocation minted anything.
2. Self-service is bounded: a child spends its root's rate-limit bucket, attenuation is
   rate-limited per lineage, and the live tokens of a lineage are capped; each refusal is a 429
   naming the limit.
8. The store's record is compared with the token's claims: a token signed with the gateway's key
   (a leaked key) under a registered jti but with other grants is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from gateway.core.keyring import Keyring
from gateway.oidc.exchange import GRANT_TYPE, ID_TOKEN_TYPE
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.servers import RecordingUpstream, ServerThread
from tests.test_oidc import EXCHANGE, github_rules
from tests.test_oidc_issuer import FakeIssuer
from tests.test_redis_store import RedisServer

ATTENUATE = "/_gateway/v1/token/attenuate"
STAGING = "/v1/apps/web-staging/machines"
StartGateway = Callable[..., RunningGateway]


@pytest.fixture(params=["sqlite", "redis"])
def start(request: pytest.FixtureRequest, tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[StartGateway]:
    """Starts a gateway on the parametrized store, with the config sections given."""
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    redis = RedisServer(tmp_path / "redis").start() if request.param == "redis" else None
    started: list[RunningGateway] = []

    def run(**sections: dict[str, Any]) -> RunningGateway:
        if redis is not None:
            sections.setdefault("store", {})["url"] = redis.url
        recorder, recorder_server = upstream
        gateway = start_gateway(tmp_path, recorder, recorder_server, **sections)
        started.append(gateway)
        return gateway

    yield run
    for gateway in started:
        gateway.server.stop()
    if redis is not None:
        redis.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def attenuate(client: httpx.Client, parent: str, grant: str = "deployer@app:web-staging",
              ttl: str = "10m") -> httpx.Response:
    return client.post(ATTENUATE, headers=bearer(parent), json={"grants": [grant], "ttl": ttl})


def jti_of(token: str) -> str:
    return str(jwt.decode(token[4:], options={"verify_signature": False})["jti"])


# --- class 1 ----------------------------------------------------------------------------------

def test_children_racing_their_parents_revocation_all_end_revoked(start: StartGateway) -> None:
    gateway = start(rate_limit={"derivations_per_minute": 0}, tokens={"max_children": 100_000})
    parent = gateway.mint("deployer@app:web-staging", ttl_s=3600, name="racing-parent")
    with gateway.client() as client:
        assert client.get(STAGING, headers=bearer(parent)).status_code == 200  # cached as live

    minted: list[tuple[float, str]] = []  # (when the call started, the child token)
    after_revocation: list[int] = []  # statuses of calls that started once the revocation was done
    revoked_at: list[float] = []
    stop = threading.Event()

    def hammer() -> None:
        with gateway.client() as client:
            while not stop.is_set():
                began = time.monotonic()
                response = attenuate(client, parent)
                if response.status_code == 201:
                    minted.append((began, response.json()["token"]))
                if revoked_at and began > revoked_at[0]:
                    after_revocation.append(response.status_code)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.4)
    gateway.revoke(jti_of(parent))  # outside the gateway, as the CLI does: it learns from the feed
    revoked_at.append(time.monotonic())
    time.sleep(0.8)
    stop.set()
    for thread in threads:
        thread.join()

    assert minted, "no child was minted before the revocation: the race was not run"
    assert after_revocation, "no attenuate call started after the revocation"
    assert set(after_revocation) == {401}, f"calls after the revocation answered {sorted(set(after_revocation))}"
    time.sleep(0.6)  # past the change feed's interval, for the gateway's cached statuses
    with gateway.client() as client:
        alive = [token for _, token in minted if client.get(STAGING, headers=bearer(token)).status_code != 401]
    assert not alive, f"{len(alive)} of {len(minted)} children outlived their parent's revocation"
    records = {record.jti: record for record in gateway.records()}
    assert all(records[jti_of(token)].revoked_at is not None for _, token in minted)


def test_a_revoked_parent_mints_nothing_even_before_the_gateway_hears_of_it(start: StartGateway) -> None:
    gateway = start()
    parent = gateway.mint("deployer@app:web-staging", ttl_s=3600)
    with gateway.client() as client:
        assert client.get(STAGING, headers=bearer(parent)).status_code == 200
        gateway.revoke(jti_of(parent))
        response = attenuate(client, parent)  # at once: the feed may not have reached the gateway yet
    assert response.status_code == 401, response.text
    assert "revoked" in response.json()["message"]
    assert len(gateway.records()) == 1  # the parent's record only


# --- class 2 ----------------------------------------------------------------------------------

def test_children_spend_their_roots_rate_limit(start: StartGateway) -> None:
    gateway = start(rate_limit={"requests_per_second": 2, "burst": 2, "derivations_per_minute": 0})
    root = gateway.mint("viewer@app:web-staging", ttl_s=3600, name="limited-viewer")
    with gateway.client() as client:
        children = [attenuate(client, root, "viewer@app:web-staging").json()["token"] for _ in range(20)]
        started = time.monotonic()
        answers = [client.get(STAGING, headers=bearer(child)) for child in children]
        elapsed = time.monotonic() - started
    allowed = sum(1 for answer in answers if answer.status_code == 200)
    assert allowed <= 2 + 2 * elapsed + 1, f"{allowed} of 20 fresh children got through a 2 rps limit"
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.json()["error"] == "rate_limited" and "retry-after" in refused.headers


def test_attenuation_is_rate_limited_per_lineage(start: StartGateway) -> None:
    gateway = start(rate_limit={"derivations_per_minute": 6})  # 6 a minute, 6 at once
    root = gateway.mint("deployer@app:*", ttl_s=3600, name="self-service")
    other = gateway.mint("deployer@app:*", ttl_s=3600, name="another-root")
    with gateway.client() as client:
        first = attenuate(client, root, "deployer@app:*")
        assert first.status_code == 201
        statuses = [attenuate(client, root).status_code for _ in range(5)]
        assert statuses == [201] * 5
        refused = attenuate(client, root)
        grandchild = attenuate(client, first.json()["token"], ttl="5m")  # the same lineage: the same allowance
        bystander = attenuate(client, other)
    assert refused.status_code == 429, refused.text
    assert "derivations_per_minute (6" in refused.json()["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert grandchild.status_code == 429
    assert bystander.status_code == 201
    assert len(gateway.records()) == 2 + 6 + 1


def test_live_tokens_of_a_lineage_are_capped(start: StartGateway) -> None:
    gateway = start(tokens={"max_children": 3}, rate_limit={"derivations_per_minute": 0})
    root = gateway.mint("deployer@app:*", ttl_s=3600, name="capped")
    with gateway.client() as client:
        child = attenuate(client, root, "deployer@app:*").json()["token"]
        assert attenuate(client, child, ttl="5m").status_code == 201  # a grandchild counts for the root too
        assert attenuate(client, root).status_code == 201
        over = attenuate(client, root)
        over_by_grandchild = attenuate(client, child, ttl="5m")
        assert over.status_code == 429 and over_by_grandchild.status_code == 429, over.text
        assert "tokens.max_children (3)" in over.json()["message"]
        gateway.revoke(jti_of(child))  # ends the child and the grandchild: two places free again
        assert attenuate(client, root).status_code == 201
    assert sum(1 for record in gateway.records() if record.revoked_at is None) == 1 + 2


# --- class 8 ----------------------------------------------------------------------------------

def test_a_token_whose_claims_differ_from_its_record_is_refused(start: StartGateway) -> None:
    gateway = start()
    genuine = gateway.mint("viewer@app:web-staging", ttl_s=3600, name="narrow")
    claims = jwt.decode(genuine[4:], options={"verify_signature": False})
    key = Keyring.load(gateway.config.tokens_keyring).active
    # A signing key that leaked: the same registered jti, wider grants.
    widened = "sgt_" + jwt.encode({**claims, "grants": ["deployer@app:*"]}, key.private_key, algorithm="EdDSA",
                                  headers={"kid": key.kid})
    with gateway.client() as client:
        assert client.get(STAGING, headers=bearer(genuine)).status_code == 200
        answer = client.post(STAGING, headers=bearer(widened), json={"config": {"image": "nginx"}})
        again = client.get(STAGING, headers=bearer(widened))
        still = client.get(STAGING, headers=bearer(genuine))
    assert answer.status_code == 401 and again.status_code == 401, answer.text
    assert "does not match the record" in answer.json()["message"]
    assert still.status_code == 200
    assert all(received.method == "GET" for received in gateway.upstream.received)


def test_a_derived_token_resigned_without_its_ancestors_grants_is_refused(start: StartGateway) -> None:
    # Red-team note: the record did not keep the chain, so a leaked key could drop the ancestors'
    # checks from a registered child. The record keeps it now and the two are compared.
    gateway = start()
    parent = gateway.mint("deployer@app:web-staging", ttl_s=3600, name="parent")
    with gateway.client() as client:
        child = attenuate(client, parent, "viewer@app:web-staging").json()["token"]
    claims = jwt.decode(child[4:], options={"verify_signature": False})
    assert claims["chain"] == [["deployer@app:web-staging"]]
    key = Keyring.load(gateway.config.tokens_keyring).active
    unchained = "sgt_" + jwt.encode({k: v for k, v in claims.items() if k != "chain"}, key.private_key,
                                    algorithm="EdDSA", headers={"kid": key.kid})
    with gateway.client() as client:
        refused = client.get(STAGING, headers=bearer(unchained))
        genuine = client.get(STAGING, headers=bearer(child))
    assert refused.status_code == 401 and "ancestors' grants" in refused.json()["message"], refused.text
    assert genuine.status_code == 200


def test_exchanges_are_rate_limited_per_trust_rule_and_replays_spend_nothing(
        tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = FakeIssuer("RSA").start()
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    recorder, recorder_server = upstream
    gateway = start_gateway(tmp_path, recorder, recorder_server, oidc={"trust": github_rules(issuer.url)},
                            rate_limit={"derivations_per_minute": 3})
    form = {"grant_type": GRANT_TYPE, "subject_token_type": ID_TOKEN_TYPE}

    def branch(name: str) -> str:  # rule web-read takes any branch; GitHub's sub names the branch
        return issuer.github_token(sub=f"repo:acme/web:ref:refs/heads/{name}", ref=f"refs/heads/{name}")

    try:
        with gateway.client() as client:
            first = branch("one")
            statuses = [client.post(EXCHANGE, data={**form, "subject_token": first}).status_code]
            # Replays of a used id token are refused by the replay cache and spend nothing.
            replays = [client.post(EXCHANGE, data={**form, "subject_token": first}).status_code for _ in range(3)]
            statuses += [client.post(EXCHANGE, data={**form, "subject_token": branch(name)}).status_code
                         for name in ("two", "three")]
            refused = client.post(EXCHANGE, data={**form, "subject_token": branch("four")})
        assert replays == [401, 401, 401]
        assert statuses == [200, 200, 200], statuses  # three branches, one rule: its allowance of 3
        assert refused.status_code == 429 and refused.json()["error"] == "rate_limited", refused.text
        assert "derivations_per_minute (3" in refused.json()["error_description"]
        assert "fresh id token" in refused.json()["error_description"]
        assert int(refused.headers["retry-after"]) >= 1
        assert len(gateway.records()) == 3
    finally:
        gateway.server.stop()
        issuer.stop()


def test_rotating_a_token_ends_its_attenuated_children_with_it(start: StartGateway) -> None:
    # Red-team finding: a rotation only shortened the old token; a child it had made lived on.
    gateway = start()
    parent = gateway.mint("deployer@app:web-staging", ttl_s=3600, name="rotated-parent")
    admin = gateway.mint("token-admin@gateway", name="admin")
    with gateway.client() as client:
        child = attenuate(client, parent, ttl="50m").json()["token"]
        grandchild = attenuate(client, child, ttl="40m").json()["token"]
        rotated = client.post(f"/_gateway/v1/tokens/{jti_of(parent)}/rotate", headers=bearer(admin),
                              json={"grace": "0s"})
        assert rotated.status_code == 201, rotated.text
        time.sleep(1.2)  # the grace of 0 s has passed; the change feed has been read
        answers = {name: client.get(STAGING, headers=bearer(token)).status_code
                   for name, token in {"parent": parent, "child": child, "grandchild": grandchild,
                                       "successor": rotated.json()["token"]}.items()}
        derived = attenuate(client, child, ttl="1m")
    assert answers == {"parent": 401, "child": 401, "grandchild": 401, "successor": 200}, answers
    assert derived.status_code == 401, derived.text
    records = {record.jti: record for record in gateway.records()}
    assert records[jti_of(child)].exp <= records[jti_of(parent)].exp


def test_a_revocation_marks_only_the_live_descendants(start: StartGateway) -> None:
    gateway = start()
    root = gateway.mint("deployer@app:web-staging", ttl_s=3600, name="many-children")
    with gateway.client() as client:
        short = [attenuate(client, root, ttl="1s").json()["token"] for _ in range(3)]
        live = attenuate(client, root, ttl="10m").json()["token"]
    time.sleep(2.1)
    revoked = set(gateway.revoke(jti_of(root)))
    assert revoked == {jti_of(root), jti_of(live)}, "expired children need no mark and no feed entry"
    records = {record.jti: record for record in gateway.records()}
    assert all(records[jti_of(token)].revoked_at is None for token in short)
    with gateway.client() as client:
        assert all(client.get(STAGING, headers=bearer(token)).status_code == 401 for token in [*short, live])


def test_a_child_of_another_role_spends_its_roots_rate(start: StartGateway) -> None:
    # Red-team finding (SQLite): a viewer child of a deployer root got a fresh bucket of its own.
    gateway = start(rate_limit={"requests_per_second": 0.01, "burst": 2, "derivations_per_minute": 0,
                                "roles": {"viewer": {"requests_per_second": 0.01, "burst": 3}}})
    root = gateway.mint("deployer@app:web-staging", ttl_s=3600, name="deployer-root")
    with gateway.client() as client:
        child = attenuate(client, root, "viewer@app:web-staging").json()["token"]
        spent = [client.get(STAGING, headers=bearer(root)).status_code for _ in range(2)]
        by_child = [client.get(STAGING, headers=bearer(child)).status_code for _ in range(3)]
    assert spent == [200, 200]
    assert by_child == [429, 429, 429], by_child
