"""Two gateway instances on one Redis (issue 4): one truth, fail closed.

Each test starts its own `redis-server` on a free port and two real gateways (uvicorn, the
gateway's own server stack) sharing the keyring file and `store.url`, in front of one recording
upstream, then shows: a revocation (and a new token, a rotation) made through instance A is
honoured by B within a second; with Redis stopped or hung both answer 503 `state_unavailable`
and forward nothing, and serve again without a restart when it returns; after FLUSHALL every
token is refused and nothing is forwarded; a rate limit is one bucket across instances; and
`scopegate store migrate` moves a SQLite deployment to Redis keeping revocations.

Redis restarts that must "serve again" use `SHUTDOWN SAVE` and start a new redis-server on the
same port and folder, which loads the dump: the same records come back, as with a persistent
production Redis. A restart *without* data is the FLUSHALL case (every token refused).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli.main import main as cli_main
from gateway.core.keyring import Keyring
from gateway.store.sqlite import SqliteStore
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway, write_config
from tests.servers import RecordingUpstream, ServerThread
from tests.test_redis_store import RedisServer, run

V1 = "/_gateway/v1"
STAGING = "/v1/apps/web-staging/machines"
WINDOW_S = 1.0  # the promise: a change made anywhere is honoured everywhere within a second


@dataclass
class Cluster:
    redis: RedisServer
    upstream: RecordingUpstream
    a: RunningGateway
    b: RunningGateway
    folder: Path

    @property
    def both(self) -> tuple[RunningGateway, RunningGateway]:
        return (self.a, self.b)

    def forwarded(self) -> int:
        return len(self.upstream.received)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(gateway: RunningGateway, token: str, path: str = STAGING) -> httpx.Response:
    return httpx.get(gateway.url + path, headers=bearer(token), timeout=10)


def status(gateway: RunningGateway, token: str) -> int:
    return call(gateway, token).status_code


def jti_of(gateway: RunningGateway, token: str) -> str:
    return gateway.services.authorizer.verifier.verify(token).jti


def wait_for(check: Callable[[], bool], within_s: float, step_s: float = 0.01) -> float:
    """Seconds until `check()` held; fails after `within_s`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within_s:
            pytest.fail(f"not within {within_s}s")
        time.sleep(step_s)
    return time.monotonic() - started


def start_instances(folder: Path, redis_url: str, upstream: tuple[RecordingUpstream, ServerThread],
                    **sections: dict[str, Any]) -> tuple[RunningGateway, RunningGateway]:
    keyring = folder / "keyring.json"
    if not keyring.exists():
        Keyring.generate(keyring).save()
    instances = []
    for name in ("a", "b"):
        (folder / name).mkdir(exist_ok=True)
        overrides: dict[str, dict[str, Any]] = {"tokens": {"keyring": str(keyring)},
                                                "store": {"url": redis_url, "timeout_ms": 200}}
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        instances.append(start_gateway(folder / name, upstream[0], upstream[1], **overrides))
    return instances[0], instances[1]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture
def make_cluster(tmp_path: Path, redis_server: RedisServer, upstream: tuple[RecordingUpstream, ServerThread],
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Cluster]]:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    started: list[RunningGateway] = []

    def make(**sections: dict[str, Any]) -> Cluster:
        a, b = start_instances(tmp_path, redis_server.url, upstream, **sections)
        started.extend((a, b))
        return Cluster(redis_server, upstream[0], a, b, tmp_path)

    yield make
    redis_server.resume()
    for running in started:
        running.server.stop()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()


# --- propagation --------------------------------------------------------------------------------

def test_revocation_through_a_is_honoured_by_b_within_a_second(cluster: Cluster) -> None:
    a, b = cluster.both
    admin = a.mint("token-admin@gateway", name="admin")
    token = a.mint("viewer@app:web-staging", name="ci")
    child = httpx.post(a.url + f"{V1}/token/attenuate", headers=bearer(token), timeout=10,
                       json={"grants": ["viewer@app:web-staging"], "ttl": "10m"}).json()["token"]
    for gateway in cluster.both:  # both instances have the records cached now
        assert status(gateway, token) == 200 and status(gateway, child) == 200

    revoked = httpx.delete(a.url + f"{V1}/tokens/{jti_of(a, token)}", headers=bearer(admin), timeout=10)
    assert revoked.status_code == 204
    forwarded = cluster.forwarded()
    assert status(a, token) == 401  # the instance that revoked: at once
    elapsed = wait_for(lambda: status(b, token) == 401, WINDOW_S)
    print(f"instance B refused the token revoked through A after {elapsed * 1000:.0f} ms")
    for gateway in cluster.both:  # the cascade reached the attenuated child on both instances
        assert status(gateway, child) == 401
        body = call(gateway, token).json()
        assert body["error"] == "unauthenticated" and "revoked" in body["message"]
    assert cluster.forwarded() == forwarded


def test_new_tokens_and_rotations_through_a_reach_b(cluster: Cluster) -> None:
    a, b = cluster.both
    admin = a.mint("token-admin@gateway", name="admin")
    minted = httpx.post(a.url + f"{V1}/tokens", headers=bearer(admin), timeout=10,
                        json={"grants": ["viewer@app:web-staging"], "ttl": "1h", "name": "fresh"})
    assert minted.status_code == 201
    fresh = minted.json()["token"]
    assert status(b, fresh) == 200  # minted on A, accepted by B straight away
    rotated = httpx.post(a.url + f"{V1}/tokens/{jti_of(a, fresh)}/rotate", headers=bearer(admin), timeout=10,
                         json={"grace": "0s"})
    assert rotated.status_code == 201
    replacement = rotated.json()["token"]
    # The old token's expiry was cut to now: B notices the shortened record within the window.
    wait_for(lambda: status(b, fresh) == 401, WINDOW_S)
    assert "expired" in call(b, fresh).json()["message"]
    assert status(b, replacement) == 200 and status(a, replacement) == 200


def test_an_instance_that_lost_redis_catches_up_on_what_it_missed(cluster: Cluster) -> None:
    a, b = cluster.both
    token = a.mint("viewer@app:web-staging")
    assert status(b, token) == 200
    # B's view of Redis goes away (its registry is told the store failed) while A revokes ...
    b.services.registry.mark_unavailable("test: the store is unreachable from B")
    a.revoke(jti_of(a, token))
    # ... and when B reads the feed again it has not lost the invalidation.
    wait_for(lambda: status(b, token) == 401, WINDOW_S)


# --- fail closed --------------------------------------------------------------------------------

def test_redis_stopped_means_503_everywhere_then_service_resumes_without_restart(cluster: Cluster) -> None:
    a = cluster.a
    token = a.mint("viewer@app:web-staging")
    admin = a.mint("token-admin@gateway", name="admin")
    for gateway in cluster.both:
        assert status(gateway, token) == 200  # cached: the hot path would not need Redis

    cluster.redis.stop(save=True)  # the dump keeps the records for the restart below
    forwarded = cluster.forwarded()
    time.sleep(0.05)  # the instances' blocked feed readers see the connection close
    for gateway in cluster.both:
        for _ in range(5):
            response = call(gateway, token)
            assert response.status_code == 503
            assert response.json()["error"] == "state_unavailable"
        assert httpx.post(gateway.url + f"{V1}/tokens", headers=bearer(admin), timeout=10,
                          json={"grants": ["viewer@app:web-staging"]}).status_code == 503
        assert httpx.get(gateway.url + "/_gateway/readyz", timeout=10).status_code == 503
    assert cluster.forwarded() == forwarded  # nothing reached the upstream

    cluster.redis.start()  # same port, same folder: loads the dump
    for gateway in cluster.both:
        wait_for(lambda gateway=gateway: status(gateway, token) == 200, 3.0)  # type: ignore[misc]
        assert httpx.get(gateway.url + "/_gateway/readyz", timeout=10).status_code == 200
    assert cluster.forwarded() == forwarded + 2


def test_hung_redis_slower_than_the_timeout_means_503(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    a = cluster.a
    token = a.mint("viewer@app:web-staging")
    for gateway in cluster.both:
        assert status(gateway, token) == 200
    cluster.redis.pause()  # SIGSTOP: connections hang, nothing answers
    try:
        # Within the cache lease (0.5 s) plus one store.timeout_ms (0.2 s) every request is refused.
        time.sleep(0.8)
        forwarded = cluster.forwarded()
        for gateway in cluster.both:
            started = time.monotonic()
            response = call(gateway, token)
            assert response.status_code == 503 and response.json()["error"] == "state_unavailable"
            assert time.monotonic() - started < 1.0  # refused within the budget, not hanging
        assert cluster.forwarded() == forwarded
    finally:
        cluster.redis.resume()
    for gateway in cluster.both:
        wait_for(lambda gateway=gateway: status(gateway, token) == 200, 3.0)  # type: ignore[misc]


def test_flushall_refuses_every_token_and_forwards_nothing(cluster: Cluster) -> None:
    a = cluster.a
    live = a.mint("viewer@app:web-staging", name="live")
    admin = a.mint("token-admin@gateway", name="admin")
    revoked = a.mint("viewer@app:web-staging", name="revoked")
    a.revoke(jti_of(a, revoked))
    for gateway in cluster.both:
        assert status(gateway, live) == 200 and status(gateway, revoked) == 401
        assert httpx.get(gateway.url + f"{V1}/tokens", headers=bearer(admin), timeout=10).status_code == 200

    forwarded = cluster.forwarded()
    cluster.redis.flushall()
    # Watch the instances notice through the admin API (authenticated, never forwarded) ...
    for gateway in cluster.both:
        wait_for(lambda gateway=gateway: httpx.get(  # type: ignore[misc]
            gateway.url + f"{V1}/tokens", headers=bearer(admin), timeout=10).status_code == 401, WINDOW_S)
    # ... then nothing passes the proxy either.
    for gateway in cluster.both:
        for token in (live, admin, revoked):  # nothing is revived, nothing passes
            response = call(gateway, token)
            assert response.status_code == 401
            assert "not registered" in response.json()["message"]
        assert httpx.get(gateway.url + f"{V1}/tokens", headers=bearer(admin), timeout=10).status_code == 401
    assert cluster.forwarded() == forwarded


def test_an_instance_started_while_redis_is_down_serves_once_it_is_up(
        tmp_path: Path, redis_server: RedisServer, upstream: tuple[RecordingUpstream, ServerThread],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    Keyring.generate(tmp_path / "keyring.json").save()
    config = write_config(tmp_path, upstream[1].url, tokens={"keyring": str(tmp_path / "keyring.json")},
                          store={"url": redis_server.url})
    assert cli_main(["token", "mint", "--config", str(config), "--grant", "viewer@app:web-staging"]) == 0
    token = capsys.readouterr().out.strip()
    redis_server.stop(save=True)
    a, b = start_instances(tmp_path, redis_server.url, upstream)  # starts: no crash loop while Redis is away
    try:
        for gateway in (a, b):
            response = call(gateway, token)
            assert response.status_code == 503 and response.json()["error"] == "state_unavailable"
            assert httpx.get(gateway.url + "/_gateway/readyz", timeout=10).status_code == 503
        assert upstream[0].received == []
        redis_server.start()
        for gateway in (a, b):
            wait_for(lambda gateway=gateway: status(gateway, token) == 200, 3.0)  # type: ignore[misc]
    finally:
        a.server.stop()
        b.server.stop()


# --- shared rate limits -------------------------------------------------------------------------

def test_rate_limit_is_one_bucket_across_instances(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(rate_limit={"requests_per_second": 0.2, "burst": 4,
                                       "roles": {"deployer": {"requests_per_second": 0.2, "burst": 2}}})
    a, b = cluster.both
    viewer = a.mint("viewer@app:web-staging", name="viewer")
    statuses = [status((a, b)[i % 2], viewer) for i in range(6)]  # a burst split across A and B
    assert statuses == [200, 200, 200, 200, 429, 429]
    for gateway in cluster.both:
        response = call(gateway, viewer)
        assert response.status_code == 429
        assert response.json()["error"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 5
    # A role override applies to every instance as well (deployer: burst 2).
    deployer = a.mint("deployer@app:web-staging", name="deployer")
    assert [status((b, a)[i % 2], deployer) for i in range(3)] == [200, 200, 429]
    assert cluster.forwarded() == 6


# --- the audit stream ---------------------------------------------------------------------------

def test_both_instances_write_one_audit_stream(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(audit={"sinks": ["redis", "file:audit.jsonl"], "redis_maxlen": 1000})
    a = cluster.a
    token = a.mint("viewer@app:web-staging")
    ids = {call(gateway, token).headers["x-request-id"] for gateway in cluster.both}

    def streamed() -> list[str]:
        with cluster.redis.admin() as client:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange("scopegate:audit")
        return [fields[b"record"].decode() for _, fields in entries]

    wait_for(lambda: ids <= {json.loads(line)["request_id"] for line in streamed()}, 2.0)
    for line in streamed():
        assert "sgt_" not in line and UPSTREAM_SECRET not in line


# --- migration from SQLite ----------------------------------------------------------------------

def test_migrate_sqlite_to_redis_keeps_tokens_and_revocations(
        tmp_path: Path, redis_server: RedisServer, upstream: tuple[RecordingUpstream, ServerThread],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    old = tmp_path / "single"
    old.mkdir()
    single = start_gateway(old, *upstream)  # the one-machine deployment: SQLite store
    keep = single.mint("viewer@app:web-staging", name="keep")
    gone = single.mint("viewer@app:web-staging", name="gone")
    parent = single.mint("viewer@app:web-staging", name="parent")
    child = httpx.post(single.url + f"{V1}/token/attenuate", headers=bearer(parent), timeout=10,
                       json={"grants": ["viewer@app:web-staging"], "ttl": "10m"}).json()["token"]
    single.revoke(jti_of(single, gone))
    single.revoke(jti_of(single, parent))  # cascades to the child (through the CLI's store: the feed tells the server)
    wait_for(lambda: [status(single, t) for t in (keep, gone, parent, child)] == [200, 401, 401, 401], WINDOW_S)
    single.server.stop()
    sqlite_url = f"sqlite:///{old / 'state.db'}"
    config = str(old / "scopegate.yaml")

    assert cli_main(["store", "migrate", "--config", config, "--from", sqlite_url, "--to", redis_server.url]) == 0
    first = capsys.readouterr().out
    assert "migrated 4 token records" in first and "4 copied" in first and "3 revoked in the target" in first
    assert cli_main(["store", "migrate", "--config", config, "--from", sqlite_url, "--to", redis_server.url,
                     "--json"]) == 0
    again = json.loads(capsys.readouterr().out)  # idempotent: nothing new, nothing changed
    counts = (again["records"], again["copied"], again["updated"], again["unchanged"], again["revoked"])
    assert counts == (4, 0, 0, 4, 3)

    monkeypatch.setenv("SCOPEGATE_STORE__URL", redis_server.url)
    assert cli_main(["store", "info", "--config", config, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["records"], info["revoked"], info["active"], info["prefix"]) == (4, 3, 1, "scopegate:")
    monkeypatch.delenv("SCOPEGATE_STORE__URL")

    # Two instances on Redis with the same keyring: the same tokens work, revoked ones stay revoked.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "keyring.json").write_bytes((old / "keyring.json").read_bytes())
    a, b = start_instances(shared, redis_server.url, upstream)
    try:
        for gateway in (a, b):
            assert [status(gateway, t) for t in (keep, gone, parent, child)] == [200, 401, 401, 401]
    finally:
        a.server.stop()
        b.server.stop()


def test_migrate_refuses_bad_arguments_and_an_unreachable_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    assert cli_main(["store", "migrate", "--from", missing, "--to", "redis://127.0.0.1:1/0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["store", "migrate", "--from", "redis://x:1/0", "--to", "redis://x:1/0"]) == 2
    assert cli_main(["store", "migrate", "--from", "memcached://x", "--to", "redis://x:1/0"]) == 2
    capsys.readouterr()
    source = tmp_path / "state.db"
    run(SqliteStore(source).close())
    assert cli_main(["store", "migrate", "--from", f"sqlite:///{source}", "--to", "redis://127.0.0.1:1/0"]) == 1
    assert "unavailable" in capsys.readouterr().err
