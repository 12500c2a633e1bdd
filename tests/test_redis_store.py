"""The Redis store against the TokenStore protocol, side by side with the SQLite store; its change
feed (trimmed, flushed, restarted, rewound -> None); fail-closed timeouts; the shared rate limiter;
the redis audit sink; the registry's fail-closed flag and cache lease; the new config keys.

Each test that needs Redis starts its own `redis-server` on a free port (never the shared one on
6379) and can stop, restart, pause (SIGSTOP) and flush it. Without `redis-server` these tests
are skipped, or fail when $CI is set, so CI cannot pass them by accident.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from gateway.config import RoleRateLimit, build_config, load_config
from gateway.core.keyring import Keyring
from gateway.core.ratelimit import LocalBuckets, RateLimits
from gateway.core.registry import TokenRegistry
from gateway.core.tokens import TokenIssuer, TokenVerifier
from gateway.errors import ConfigError, RateLimited, StateUnavailable, Unauthenticated
from gateway.services import Services
from gateway.store import TokenRecord, TokenStore
from gateway.store.redis import RedisBuckets, RedisStore, redact
from gateway.store.redis_audit import RedisSink
from gateway.store.sqlite import SqliteStore
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, start_gateway, write_config
from tests.servers import RecordingUpstream, ServerThread

T = TypeVar("T")
REDIS_SERVER = shutil.which("redis-server")
NOW = int(time.time())


def later(seconds: int) -> int:
    """A time `seconds` from now (not from import: the suite may run for minutes)."""
    return int(time.time()) + seconds


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def require_redis() -> str:
    if REDIS_SERVER is None:
        # Never a skip: the Redis backend is untested without it. .ci/run installs it.
        pytest.fail("redis-server is not installed; run `apt-get install redis-server` (.ci/run does)")
    return REDIS_SERVER


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server: no persistence unless asked (`stop(save=True)` writes dump.rdb in
    `folder`, which the next `start` on the same folder loads)."""

    def __init__(self, folder: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.binary = require_redis()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def start(self) -> RedisServer:
        errors_path = self.folder / "redis.stderr"
        with errors_path.open("wb") as errors_file:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--dbfilename", "dump.rdb", "--logfile", str(self.folder / "redis.log"),
                 *self.extra],
                stdout=subprocess.DEVNULL, stderr=errors_file)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                log = (self.folder / "redis.log").read_text() if (self.folder / "redis.log").exists() else ""
                errors = errors_path.read_text(errors="replace")
                self.proc = None
                raise RuntimeError(f"redis-server on port {self.port} exited: {errors[-2000:]} {log[-2000:]}")
            try:
                with self.admin() as client:
                    if client.ping():
                        return self
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def stop(self, *, save: bool = False) -> None:
        if self.proc is None:
            return
        self.resume()
        if save:
            with self.admin() as client:
                client.shutdown(save=True)
        else:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None

    def forget_data(self) -> None:
        (self.folder / "dump.rdb").unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel and then nothing answers (a hung Redis)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def flushall(self) -> None:
        with self.admin() as client:
            client.flushall()

    def kill(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], TokenStore]:
    """A factory (stores are bound to the event loop of their first call), for both backends."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "state.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisStore(server.url, prefix="t:")


def record(jti: str, *, iat: int = NOW, exp: int = NOW + 3600, parent: str | None = None,
           grants: tuple[str, ...] = ("viewer@app:web-staging",)) -> TokenRecord:
    return TokenRecord(jti=jti, sub=f"test:{jti}", name=f"name-{jti}", grants=grants, iat=iat, exp=exp, parent=parent)


async def using(factory: Callable[[], TokenStore], work: Callable[[TokenStore], Awaitable[T]]) -> T:
    store = factory()
    try:
        return await work(store)
    finally:
        await store.close()


# --- the protocol, on both backends -------------------------------------------------------------

def test_put_get_round_trip(make_store: Callable[[], TokenStore]) -> None:
    full = TokenRecord(jti="j1", sub="ci:github:acme/web", name="web ci", grants=("deployer@app:web-*", "viewer@env:x"),
                       iat=NOW, exp=NOW + 60, parent="p0", revoked_at=None, revoked_reason=None, last_used_at=NOW)

    async def work(store: TokenStore) -> None:
        await store.put(full)
        assert await store.get("j1") == full
        assert await store.get("missing") is None
        await store.ping()

    run(using(make_store, work))


def test_records_are_listed_by_iat_with_or_without_revoked(make_store: Callable[[], TokenStore]) -> None:
    async def work(store: TokenStore) -> None:
        for jti, iat in (("c", NOW + 2), ("a", NOW), ("b", NOW + 1), ("a2", NOW)):
            await store.put(record(jti, iat=iat))
        assert [r.jti for r in await store.records()] == ["a", "a2", "b", "c"]
        await store.revoke("b", reason="gone", at=NOW)
        assert [r.jti for r in await store.records(include_revoked=False)] == ["a", "a2", "c"]
        revoked = [r for r in await store.records() if r.revoked_at is not None]
        assert [(r.jti, r.revoked_at, r.revoked_reason) for r in revoked] == [("b", NOW, "gone")]

    run(using(make_store, work))


def test_revoke_cascades_to_every_descendant(make_store: Callable[[], TokenStore]) -> None:
    # root -> rot (rotation) -> att (attenuation of the rotation); root -> other; unrelated stays live.
    async def work(store: TokenStore) -> None:
        await store.put(record("root"))
        await store.put(record("rot", parent="root"))
        await store.put(record("att", parent="rot"))
        await store.put(record("other", parent="root"))
        await store.put(record("unrelated"))
        assert sorted(await store.revoke("rot", reason=None, at=NOW)) == ["att", "rot"]
        assert sorted(await store.revoke("root", reason="leak", at=NOW + 1)) == ["other", "root"]
        assert await store.revoke("root", reason="again", at=NOW + 2) == []
        assert await store.revoke("nope", reason=None, at=NOW) == []
        by_jti = {r.jti: r for r in await store.records()}
        assert by_jti["unrelated"].revoked_at is None
        assert (by_jti["rot"].revoked_at, by_jti["rot"].revoked_reason) == (NOW, None)
        assert (by_jti["root"].revoked_at, by_jti["root"].revoked_reason) == (NOW + 1, "leak")
        assert by_jti["att"].revoked_at == NOW  # the first revocation stands

    run(using(make_store, work))


def test_revoke_walks_through_already_revoked_tokens(make_store: Callable[[], TokenStore]) -> None:
    # A live grandchild under a revoked child (e.g. copied in by a migration) still falls with the root.
    async def work(store: TokenStore) -> None:
        await store.put(record("root"))
        await store.put(record("child", parent="root"))
        await store.revoke("child", reason=None, at=NOW)
        await store.put(record("late", parent="child"))
        assert sorted(await store.revoke("root", reason=None, at=NOW)) == ["late", "root"]
        late = await store.get("late")
        assert late is not None and late.revoked_at == NOW

    run(using(make_store, work))


def test_shorten_only_moves_expiry_earlier(make_store: Callable[[], TokenStore]) -> None:
    async def work(store: TokenStore) -> None:
        await store.put(record("t", exp=NOW + 3600))
        await store.shorten("t", exp=NOW + 60)
        await store.shorten("t", exp=NOW + 7200)
        got = await store.get("t")
        assert got is not None and got.exp == NOW + 60
        await store.shorten("missing", exp=NOW)  # no record: nothing to do, no error

    run(using(make_store, work))


def test_touch_keeps_the_latest_use(make_store: Callable[[], TokenStore]) -> None:
    async def work(store: TokenStore) -> None:
        await store.put(record("t"))
        await store.touch({"t": NOW + 10, "missing": NOW})
        await store.touch({"t": NOW + 5})
        await store.touch({})
        got = await store.get("t")
        assert got is not None and got.last_used_at == NOW + 10
        assert await store.get("missing") is None  # touch never creates records

    run(using(make_store, work))


def test_change_feed_names_every_write(make_store: Callable[[], TokenStore]) -> None:
    async def work(store: TokenStore) -> None:
        start = await store.current_cursor()
        assert await store.changes_since(start) == (start, [])
        await store.put(record("a"))
        await store.put(record("b", parent="a"))
        cursor, changed = await store.changes_since(start)
        assert changed == ["a", "b"]
        assert await store.changes_since(cursor) == (cursor, [])
        await store.revoke("a", reason=None, at=NOW)
        await store.shorten("b", exp=NOW + 1)
        await store.touch({"a": NOW})  # last use is bookkeeping, not a change
        cursor2, changed = await store.changes_since(cursor)
        assert changed is not None and sorted(changed[:2]) == ["a", "b"] and changed[2:] == ["b"]
        assert await store.current_cursor() == cursor2

    run(using(make_store, work))


def test_claim_once_is_a_replay_cache(make_store: Callable[[], TokenStore]) -> None:
    async def work(store: TokenStore) -> None:
        assert await store.claim_once("oidc:issuer:jti-1", expires_at=later(300)) is True
        assert await store.claim_once("oidc:issuer:jti-1", expires_at=later(300)) is False
        assert await store.claim_once("oidc:issuer:jti-2", expires_at=later(300)) is True

    run(using(make_store, work))


def test_remembered_facts_are_recalled_until_they_expire(make_store: Callable[[], TokenStore]) -> None:
    async def work(store: TokenStore) -> None:
        assert await store.recall("release:r1") is None
        await store.remember("release:r1", "web-staging", expires_at=later(300))
        await store.remember("release:r2", "web-prod", expires_at=later(-10))  # already expired
        assert await store.recall("release:r1") == "web-staging"
        assert await store.recall("release:r2") is None
        await store.remember("release:r1", "web-other", expires_at=later(300))  # the newest answer wins
        assert await store.recall("release:r1") == "web-other"

    run(using(make_store, work))


# --- Redis specifics: keys, expiry, the feed's resets -------------------------------------------

def test_keys_live_under_the_prefix_and_claims_expire(redis_server: RedisServer) -> None:
    async def work() -> None:
        a, b = RedisStore(redis_server.url, prefix="sg-a:"), RedisStore(redis_server.url, prefix="sg-b:")
        try:
            await a.put(record("x"))
            await a.claim_once("k", expires_at=later(100))
            await a.take("x", rate=1, burst=2)
            await a.current_cursor()
            assert await b.get("x") is None and await b.records() == []
            assert await b.claim_once("k", expires_at=later(100)) is True  # separate namespaces
        finally:
            await a.close()
            await b.close()

    run(work())
    with redis_server.admin() as client:
        keys = sorted(k.decode() for k in client.keys("*"))
        assert all(k.startswith(("sg-a:", "sg-b:")) for k in keys), keys
        assert {"sg-a:tok:x", "sg-a:tokens", "sg-a:changes", "sg-a:epoch", "sg-a:once:k", "sg-a:rl:x"} <= set(keys)
        ttl = client.ttl("sg-a:once:k")
        assert isinstance(ttl, int) and 0 < ttl <= 100
        assert client.ttl("sg-a:tok:x") == -1  # records do not expire on their own: the listing keeps them
        assert client.pttl("sg-a:rl:x") > 0  # idle buckets do


def test_feed_trimmed_past_the_cursor_says_it_cannot_tell(redis_server: RedisServer) -> None:
    async def work() -> None:
        store = RedisStore(redis_server.url, prefix="t:", feed_maxlen=10)
        try:
            behind = await store.current_cursor()
            await store.put(record("first"))
            caught_up, changed = await store.changes_since(behind)
            assert changed == ["first"]
            for i in range(600):  # MAXLEN ~ trims whole stream nodes (100 entries each)
                await store.shorten("first", exp=NOW + 3600 - i)
            cursor, changed = await store.changes_since(caught_up)
            assert changed is None
            assert await store.changes_since(cursor) == (cursor, [])  # the new cursor is good again
        finally:
            await store.close()

    run(work())
    with redis_server.admin() as client:
        assert client.xlen("t:changes") < 300


def test_feed_after_flushall_says_it_cannot_tell(redis_server: RedisServer) -> None:
    async def work() -> None:
        store = RedisStore(redis_server.url, prefix="t:")
        try:
            await store.put(record("a"))
            cursor = await store.current_cursor()
            redis_server.flushall()
            new_cursor, changed = await store.changes_since(cursor)
            assert changed is None
            assert new_cursor.partition(":")[0] != cursor.partition(":")[0]  # a new epoch
            assert await store.get("a") is None
            await store.put(record("b"))  # writes after the flush are followed normally
            assert (await store.changes_since(new_cursor))[1] == ["b"]
            # A cursor from before the start (the registry's initial "0") cannot be trusted either.
            assert (await store.changes_since("0"))[1] is None
        finally:
            await store.close()

    run(work())


def test_feed_after_a_restart_without_data_or_a_rewound_stream(redis_server: RedisServer) -> None:
    async def work() -> None:
        store = RedisStore(redis_server.url, prefix="t:")
        try:
            await store.put(record("a"))
            cursor = await store.current_cursor()
            redis_server.stop()
            redis_server.forget_data()
            redis_server.start()
            cursor2, changed = await store.changes_since(cursor)
            assert changed is None
            await store.put(record("b"))
            cursor3, changed = await store.changes_since(cursor2)
            assert changed == ["b"]
            # The stream alone went away (restored from an older snapshot, or deleted): never trust it.
            with redis_server.admin() as client:
                client.delete("t:changes")
            assert (await store.changes_since(cursor3))[1] is None
        finally:
            await store.close()

    run(work())


def test_restart_with_data_keeps_records_and_cursor(redis_server: RedisServer) -> None:
    async def work() -> None:
        store = RedisStore(redis_server.url, prefix="t:")
        try:
            await store.put(record("a"))
            cursor = await store.current_cursor()
            redis_server.stop(save=True)
            redis_server.start()
            # The pooled connection died with the old process; the same store object recovers.
            assert await store.get("a") == record("a")
            assert await store.changes_since(cursor) == (cursor, [])
        finally:
            await store.close()

    run(work())


def test_feed_gap_after_the_stream_is_recreated(redis_server: RedisServer) -> None:
    # The stream alone deleted and written again (the counter survives): the next entry is not n + 1.
    async def work() -> None:
        store = RedisStore(redis_server.url, prefix="t:")
        try:
            await store.put(record("a"))
            cursor = await store.current_cursor()
            await store.put(record("b"))
            with redis_server.admin() as client:
                client.delete("t:changes")
            await store.put(record("c"))
            assert (await store.changes_since(cursor))[1] is None
            # The counter alone lost (n starts again at 1): also a gap, never a silent skip.
            cursor = await store.current_cursor()
            with redis_server.admin() as client:
                client.delete("t:changes:n")
            await store.put(record("d"))
            assert (await store.changes_since(cursor))[1] is None
        finally:
            await store.close()

    run(work())


def test_claim_once_is_shared_by_instances(redis_server: RedisServer) -> None:
    async def work() -> list[bool]:
        stores = [RedisStore(redis_server.url, prefix="t:") for _ in range(2)]
        try:
            return list(await asyncio.gather(*(stores[i % 2].claim_once("oidc:jti-x", expires_at=later(60))
                                               for i in range(10))))
        finally:
            for store in stores:
                await store.close()

    assert sorted(run(work())) == [False] * 9 + [True]


def test_wait_for_change_wakes_on_a_write_and_on_a_lost_connection(redis_server: RedisServer) -> None:
    async def work() -> None:
        store = RedisStore(redis_server.url, prefix="t:")
        writer = RedisStore(redis_server.url, prefix="t:")
        try:
            cursor = await store.current_cursor()
            started = time.monotonic()
            await store.wait_for_change(cursor, 0.2)  # nothing happens: the timeout
            assert 0.15 < time.monotonic() - started < 1.0

            async def write_soon() -> None:
                await asyncio.sleep(0.05)
                await writer.put(record("a"))

            started = time.monotonic()
            await asyncio.gather(store.wait_for_change(cursor, 5.0), write_soon())
            assert time.monotonic() - started < 1.0  # woken by the write, not the 5 s timeout

            cursor = await store.current_cursor()
            waiting = asyncio.ensure_future(store.wait_for_change(cursor, 5.0))
            await asyncio.sleep(0.1)
            await asyncio.get_running_loop().run_in_executor(None, redis_server.stop)
            started = time.monotonic()
            await waiting  # the connection closed: back at once, so the caller notices the outage
            assert time.monotonic() - started < 1.0
        finally:
            await store.close()
            await writer.close()

    run(work())


def test_sentinel_url_finds_the_master(redis_server: RedisServer, tmp_path: Path) -> None:
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\n"
                    f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n")
    proc = subprocess.Popen([require_redis(), str(conf), "--sentinel", "--logfile", str(tmp_path / "sentinel.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=sentinel_port, socket_timeout=1) as sentinel:
                    if sentinel.ping():
                        break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

        async def work() -> None:
            store = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0", prefix="s:")
            try:
                await store.put(record("a"))
                assert await store.get("a") == record("a")
                assert (await store.changes_since(await store.current_cursor()))[1] == []
            finally:
                await store.close()

        run(work())
        with redis_server.admin() as client:
            assert client.exists("s:tok:a") == 1  # written to the master the sentinel named
    finally:
        proc.kill()
        proc.wait(timeout=10)
    for bad in ("redis+sentinel://127.0.0.1/mymaster", "redis+sentinel://127.0.0.1:1/",
                "redis+sentinel://127.0.0.1:1/m/x", "redis+sentinel://127.0.0.1:1/m?foo=1"):
        with pytest.raises(ConfigError):
            RedisStore(bad)


def test_rediss_url_speaks_tls(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    tls_port = free_port()
    server = RedisServer(tmp_path / "redis-tls", extra=(
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"))
    try:
        server.start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.fail(f"this redis-server is built without TLS, so rediss:// cannot be tested: {exc}")
        raise
    try:
        async def work() -> None:
            store = RedisStore(f"rediss://localhost:{tls_port}/0?ssl_ca_certs={ca}", prefix="tls:")
            plain = RedisStore(f"redis://localhost:{tls_port}/0", prefix="tls:", timeout_ms=300)
            try:
                await store.put(record("a"))
                assert await store.get("a") == record("a")
                with pytest.raises(StateUnavailable):  # no TLS, no answer: refused, not hanging
                    await plain.get("a")
            finally:
                await store.close()
                await plain.close()

        run(work())
    finally:
        server.kill()


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scopegate test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return paths


# --- fail closed --------------------------------------------------------------------------------

def test_unreachable_redis_is_state_unavailable_on_every_call() -> None:
    async def work() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=200)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.put(record("a")), lambda: store.get("a"), lambda: store.records(),
            lambda: store.revoke("a", reason=None, at=NOW), lambda: store.shorten("a", exp=NOW),
            lambda: store.touch({"a": NOW}), lambda: store.changes_since("x:0-0"), lambda: store.current_cursor(),
            lambda: store.claim_once("k", expires_at=later(10)), lambda: store.ping(),
            lambda: store.take("a", rate=1, burst=1)]
        try:
            for call in calls:
                started = time.monotonic()
                with pytest.raises(StateUnavailable) as info:
                    await call()
                assert time.monotonic() - started < 1.0
                assert info.value.status == 503 and info.value.code == "state_unavailable"
                assert "store.timeout_ms" in info.value.message
        finally:
            await store.close()

    run(work())


def test_hung_redis_is_state_unavailable_within_the_budget(redis_server: RedisServer) -> None:
    async def work() -> None:
        store = RedisStore(redis_server.url, prefix="t:", timeout_ms=200)
        fresh = RedisStore(redis_server.url, prefix="t:", timeout_ms=200)  # no pooled connection yet
        try:
            await store.put(record("a"))
            redis_server.pause()
            for client in (store, fresh):
                started = time.monotonic()
                with pytest.raises(StateUnavailable):
                    await client.get("a")
                assert time.monotonic() - started < 0.7
            redis_server.resume()
            assert await store.get("a") == record("a")  # back without a new store
        finally:
            redis_server.resume()
            await store.close()
            await fresh.close()

    run(work())


def test_passwords_never_appear_in_messages() -> None:
    assert redact("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("rediss://user:s3cret@db:6380/1") == "rediss://user:***@db:6380/1"
    assert redact("redis://db:6379/0") == "redis://db:6379/0"
    assert redact("redis+sentinel://:pw@s1:26379,s2:26379/main/0?sentinel_password=s3cret") == \
        "redis+sentinel://:***@s1:26379,s2:26379/main/0?sentinel_password=***"

    async def work() -> str:
        store = RedisStore(f"redis://:s3cret@127.0.0.1:{free_port()}/0", timeout_ms=100)
        try:
            with pytest.raises(StateUnavailable) as info:
                await store.get("a")
            return info.value.message
        finally:
            await store.close()

    assert "s3cret" not in run(work())


# --- the shared rate limiter --------------------------------------------------------------------

def test_rate_limit_bucket_is_shared_by_clients(redis_server: RedisServer) -> None:
    async def work() -> None:
        one, two = RedisStore(redis_server.url, prefix="t:"), RedisStore(redis_server.url, prefix="t:")
        limiters = [RedisBuckets(one, 0.5, 4), RedisBuckets(two, 0.5, 4)]
        try:
            for i in range(4):
                await limiters[i % 2].take("jti-1", "tok")
            for limiter in limiters:
                with pytest.raises(RateLimited) as info:
                    await limiter.take("jti-1", "tok")
                assert info.value.status == 429
                assert info.value.headers["Retry-After"] in ("1", "2")
            await limiters[0].take("jti-2", "other")  # buckets are per token
            await RedisBuckets(one, 0, 0).take("jti-1", "tok")  # disabled: never limited
        finally:
            await one.close()
            await two.close()

    run(work())


def test_most_generous_role_limit_wins() -> None:
    limiter = RateLimits(LocalBuckets, (10.0, 20),
                        {"deployer": (2.0, 4), "admin": (0.0, 0), "operator": (50.0, 5)})
    assert limiter.limits_for(["deployer"]) == (2.0, 4)
    assert limiter.limits_for(["deployer", "viewer"]) == (10.0, 20)  # viewer has the default
    assert limiter.limits_for(["deployer", "operator"]) == (50.0, 5)
    assert limiter.limits_for(["deployer", "admin"]) == (0.0, 0)  # unlimited
    assert limiter.limits_for([]) == (10.0, 20)


def test_role_limits_with_the_sqlite_store_and_config_checks(
        tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = start_gateway(tmp_path, *upstream, rate_limit={
        "requests_per_second": 0.1, "burst": 3, "roles": {"deployer": {"requests_per_second": 0.1, "burst": 1}}})
    try:
        assert running.services.authorizer.limits.roles == {"deployer": (0.1, 1)}
        deployer, viewer = running.mint("deployer@app:web-staging"), running.mint("viewer@app:web-staging")
        with running.client() as client:
            def statuses(token: str, count: int) -> list[int]:
                return [client.get("/v1/apps/web-staging/machines", headers={"Authorization": f"Bearer {token}"})
                        .status_code for _ in range(count)]

            assert statuses(deployer, 2) == [200, 429]
            assert statuses(viewer, 4) == [200, 200, 200, 429]
    finally:
        running.server.stop()
    config = load_config(write_config(tmp_path, upstream[1].url, rate_limit={
        "roles": {"no-such-role": {"requests_per_second": 1}}}))
    with pytest.raises(ConfigError, match="no-such-role"):
        Services.build(config)
    config = load_config(write_config(tmp_path, upstream[1].url, audit={"sinks": ["redis"]}))
    with pytest.raises(ConfigError, match="redis sink"):
        Services.build(config)


# --- the redis audit sink -----------------------------------------------------------------------

def test_audit_sink_appends_to_a_capped_stream_and_survives_an_outage(redis_server: RedisServer) -> None:
    async def work() -> None:
        store = RedisStore(redis_server.url, prefix="t:")
        sink = RedisSink(store.client, "t:audit", maxlen=150, timeout_s=0.3)
        try:
            for i in range(1000):
                sink.write([json.dumps({"n": i}) + "\n"])
            await sink.drain()
            with redis_server.admin() as client:
                entries = client.xrange("t:audit")
                assert 150 <= len(entries) < 400
                assert json.loads(entries[-1][1][b"record"]) == {"n": 999}
            redis_server.stop(save=True)
            sink.write([json.dumps({"n": "during"}) + "\n"])
            await asyncio.sleep(0.5)
            redis_server.start()
            await sink.drain(timeout_s=3)
            with redis_server.admin() as client:
                assert json.loads(client.xrevrange("t:audit", count=1)[0][1][b"record"]) == {"n": "during"}
        finally:
            await store.close()

    run(work())


# --- the registry: fail closed even for cached records ------------------------------------------

class SlowStore(SqliteStore):
    """A SQLite store whose `get` can be made to yield (as a network store does) or to fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gets = 0
        self.during_get: Callable[[], Awaitable[None]] | None = None
        self.down = False

    async def get(self, jti: str) -> TokenRecord | None:
        self.gets += 1
        if self.down:
            raise StateUnavailable("down")
        found = await super().get(jti)
        if self.during_get is not None:
            await self.during_get()
        return found

    async def changes_since(self, cursor: str) -> tuple[str, list[str] | None]:
        if self.down:
            raise StateUnavailable("down")
        return await super().changes_since(cursor)


def registry_with(store: TokenStore, tmp_path: Path) -> tuple[TokenRegistry, TokenIssuer]:
    issuer = TokenIssuer(Keyring.generate(tmp_path / "keyring.json"), "scopegate", "scopegate")
    registry = TokenRegistry(store, issuer, known_roles=lambda: {"viewer", "token-admin"},
                             environments=frozenset({"staging"}), default_ttl_s=3600,
                             max_ttl_s=86400)
    return registry, issuer


def test_registry_refuses_cached_tokens_while_the_store_is_down(tmp_path: Path) -> None:
    async def work() -> None:
        store = SlowStore(tmp_path / "state.db")
        registry, issuer = registry_with(store, tmp_path)
        registry.lease_s = 60
        await registry.start()
        minted = await registry.mint(grants=["viewer@app:a"], ttl_s=600, name="n", subject="s")
        claims = TokenVerifier(issuer.keyring, "scopegate", "scopegate").verify(minted.token)
        await registry.check(claims)
        await registry.check(claims)
        assert store.gets == 1  # cached
        store.down = True
        with pytest.raises(StateUnavailable):
            await registry.sync()
        registry.mark_unavailable("the token store is down")  # what the sync loop does on failure
        with pytest.raises(StateUnavailable) as info:
            await registry.check(claims)
        assert info.value.message == "the token store is down"
        store.down = False
        await registry.sync()
        await registry.check(claims)
        # The lease: a cached record is used only while the feed was read recently.
        registry.lease_s = 0.05
        await registry.sync()
        await asyncio.sleep(0.1)
        gets = store.gets
        await registry.check(claims)
        assert store.gets == gets + 1  # read through
        await store.close()

    run(work())


def test_registry_does_not_cache_a_read_that_raced_a_revocation(tmp_path: Path) -> None:
    async def work() -> None:
        store = SlowStore(tmp_path / "state.db")
        registry, issuer = registry_with(store, tmp_path)
        other, _ = registry_with(store, tmp_path)  # another process revoking through the same store
        await registry.start()
        minted = await registry.mint(grants=["viewer@app:a"], ttl_s=600, name="n", subject="s")
        claims = TokenVerifier(issuer.keyring, "scopegate", "scopegate").verify(minted.token)

        async def revoke_meanwhile() -> None:
            store.during_get = None
            await other.revoke(claims.jti, reason=None)
            await registry.sync()  # the feed names the token while the read is in flight

        store.during_get = revoke_meanwhile
        await registry.check(claims)  # read before the revocation: this request passes ...
        with pytest.raises(Unauthenticated):  # ... but the stale answer was not cached
            await registry.check(claims)
        await store.close()

    run(work())


# --- configuration ------------------------------------------------------------------------------

def test_config_keys_for_the_redis_store(tmp_path: Path) -> None:
    def build(raw: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
        return build_config(raw, base_dir=tmp_path, source="test", environ=environ or {})

    config = build({"store": {"url": "redis://10.0.0.5:6379/2", "timeout_ms": 250, "prefix": "sg1:"},
                    "audit": {"sinks": ["redis"], "redis_maxlen": 5000},
                    "rate_limit": {"requests_per_second": 10, "burst": 20,
                                   "roles": {"deployer": {"requests_per_second": 2, "burst": 5}}}})
    assert (config.store_url, config.store_timeout_ms, config.store_prefix) == ("redis://10.0.0.5:6379/2", 250, "sg1:")
    assert (config.audit_sinks, config.audit_redis_maxlen) == (("redis",), 5000)
    assert config.rate_limit_roles == (RoleRateLimit("deployer", 2.0, 5),)
    defaults = build({})
    assert (defaults.store_timeout_ms, defaults.store_prefix, defaults.audit_redis_maxlen,
            defaults.rate_limit_roles) == (500, "scopegate:", 100_000, ())
    from_env = build({}, {"SCOPEGATE_RATE_LIMIT__ROLES": '{"admin": {"requests_per_second": 0}}',
                          "SCOPEGATE_STORE__URL": "rediss://:pw@cache:6380/0", "SCOPEGATE_STORE__TIMEOUT_MS": "100"})
    assert from_env.rate_limit_roles == (RoleRateLimit("admin", 0.0, 0),)
    assert (from_env.store_url, from_env.store_timeout_ms) == ("rediss://:pw@cache:6380/0", 100)
    for raw, named in (
        ({"store": {"timeout_ms": 0}}, "store.timeout_ms"),
        ({"store": {"prefix": "has space"}}, "store.prefix"),
        ({"store": {"url": "memcached://x"}}, "store.url"),
        ({"audit": {"redis_maxlen": -1}}, "audit.redis_maxlen"),
        ({"rate_limit": {"roles": {"deployer": {"burst": 3}}}}, "rate_limit.roles"),
        ({"rate_limit": {"roles": {"deployer": {"requests_per_second": -1}}}}, "rate_limit.roles"),
        ({"rate_limit": {"roles": ["deployer"]}}, "rate_limit.roles"),
    ):
        with pytest.raises(ConfigError) as info:
            build(raw)
        assert named in str(info.value)
