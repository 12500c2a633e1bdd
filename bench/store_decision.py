"""The decision path with the Redis store against the SQLite store, in one run.

Each iteration does what `MachinesSurface.handle` does before forwarding: `canonicalize`,
`bearer_token` + `TokenVerifier.verify`, `TokenRegistry.check`, `RouteTable.resolve` +
`resolve_request`, `EnvironmentResolver.resolve` and `decide` (shipped policy, a token granted
`viewer@app:web-staging`, `GET /v1/apps/web-staging/machines`), with warm caches and the
registry's cache lease switched on as in a running gateway. With warm caches the hot path does
not touch the store, so the two should match: the line shows that moving to Redis costs the
decision path nothing. For context it also reports what does touch Redis: a registry read on a
cache miss (`store.get`, SQLite vs Redis) and the shared rate limiter's per-request script.

Redis: a private `redis-server` on a free port (never the shared one on 6379), or `--redis-url`.

    python bench/store_decision.py [--iterations 20000] [--tokens 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.environments import EnvironmentResolver
from gateway.core.grants import parse_grants
from gateway.core.keyring import Keyring
from gateway.core.policy import PolicyEngine, decide
from gateway.core.registry import TokenRegistry
from gateway.core.tokens import TokenIssuer, TokenVerifier, bearer_token
from gateway.store import TokenRecord, TokenStore
from gateway.store.redis import RedisBuckets, RedisStore
from gateway.store.sqlite import SqliteStore
from gateway.surfaces.paths import canonicalize
from gateway.surfaces.routes import RouteTable, resolve_request

REPO = Path(__file__).resolve().parent.parent
ISSUER = AUDIENCE = "scopegate-bench"
RAW_PATH = b"/v1/apps/web-staging/machines"
GRANT = "viewer@app:web-staging"
ROUNDS = 8


def p50_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000


class PrivateRedis:
    """redis-server on a free loopback port, no persistence, removed on exit."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("store_decision: redis-server is not installed (apt-get install redis-server), "
                             "or pass --redis-url")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit("store_decision: redis-server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


async def fill(store: TokenStore, issuer: TokenIssuer, count: int) -> list[str]:
    grants = parse_grants([GRANT])
    tokens = []
    for i in range(count):
        token, claims = issuer.mint(sub=f"bench:{i}", name=f"bench-{i}", grants=grants, ttl_s=86400)
        await store.put(TokenRecord(jti=claims.jti, sub=claims.sub, name=claims.name,
                                    grants=tuple(claims.grant_strings()), iat=claims.iat, exp=claims.exp))
        tokens.append(token)
    return tokens


class DecisionPath:
    """The proxy's pre-forwarding steps over one store, registry caches warm."""

    def __init__(self, store: TokenStore, issuer: TokenIssuer, keyring: Keyring, token: str) -> None:
        self.routes = RouteTable.load([REPO / "policies/routes/fly-machines.yaml"])
        self.policy = PolicyEngine(REPO / "policies/model.conf", REPO / "policies/policy.csv")
        self.environments = EnvironmentResolver((("*-staging", "staging"), ("*-prod", "production")), "development")
        self.verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
        self.registry = TokenRegistry(store, issuer, known_roles=self.policy.roles,
                                      environments=frozenset({"staging", "production"}), default_ttl_s=86400,
                                      max_ttl_s=86400 * 90)
        self.registry.lease_s = 3600.0  # as in a running gateway, whose sync loop keeps the lease fresh
        self.header = f"Bearer {token}".encode()

    async def samples(self, iterations: int) -> list[int]:
        routes, policy, environments, verifier, registry = (self.routes, self.policy, self.environments,
                                                             self.verifier, self.registry)
        header = self.header
        clock = time.perf_counter_ns
        samples = [0] * iterations
        for i in range(iterations):
            t0 = clock()
            target = canonicalize(RAW_PATH, b"")
            claims = verifier.verify(bearer_token([header]))
            await registry.check(claims)
            match = routes.resolve("GET", target.path)
            resolved = resolve_request(match, target.raw_query, None)
            env = environments.resolve(resolved.app) if resolved.app is not None else None
            decision = decide(claims.grants, policy, app=resolved.app, env=env, action=resolved.action,
                              token_name=claims.name, env_of=environments.resolve,
                              org_filtered=resolved.route.filter_apps)
            samples[i] = clock() - t0
            if not decision.allowed:
                raise AssertionError(f"the benchmark request was denied: {decision.reason}")
        return samples


async def call_samples(call: Callable[[int], Awaitable[object]], iterations: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for i in range(iterations):
        t0 = clock()
        await call(i)
        samples.append(clock() - t0)
    return samples


async def run(iterations: int = 20_000, tokens: int = 1_000, redis_url: str | None = None,
              log: Any = print) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="sg-store-decision-"))
    private = PrivateRedis(folder) if redis_url is None else None
    try:
        url = redis_url or (private.url if private else "")
        keyring = Keyring.generate(folder / "keyring.json")
        issuer = TokenIssuer(keyring, ISSUER, AUDIENCE)
        results: dict[str, Any] = {"iterations": iterations, "tokens": tokens}
        prefix = f"sg-bench-{secrets.token_hex(4)}:"
        stores: dict[str, TokenStore] = {"sqlite": SqliteStore(folder / "state.db"),
                                         "redis": RedisStore(url, prefix=prefix)}
        try:
            paths: dict[str, DecisionPath] = {}
            for name, store in stores.items():
                minted = await fill(store, issuer, tokens)
                jtis = [TokenVerifier(keyring, ISSUER, AUDIENCE).verify(t).jti for t in minted]

                async def read(i: int, store: TokenStore = store, jtis: list[str] = jtis) -> object:
                    return await store.get(jtis[i % len(jtis)])

                reads = await call_samples(read, min(iterations, 5_000))
                results[name] = {"store_get_p50_us": p50_us(reads)}
                paths[name] = DecisionPath(store, issuer, keyring, minted[-1])
                await paths[name].registry.start()
                await paths[name].samples(2_000)  # warm every cache
            # Alternate the two in rounds, so that neither gets the quieter half of the run.
            decisions: dict[str, list[int]] = {name: [] for name in paths}
            gc.collect()
            for _ in range(ROUNDS):
                for name, path in paths.items():
                    decisions[name] += await path.samples(max(iterations // ROUNDS, 1))
            for name, samples in decisions.items():
                results[name].update(decision_p50_us=p50_us(samples), decision_mean_us=statistics.fmean(samples) / 1000)
                log(f"  {name:6} decision p50 {results[name]['decision_p50_us']:6.1f} µs (warm caches); "
                    f"store read on a cache miss p50 {results[name]['store_get_p50_us']:6.1f} µs")
            redis_store = stores["redis"]
            assert isinstance(redis_store, RedisStore)
            limiter = RedisBuckets(redis_store, 1e9, 1_000_000)

            async def take(i: int) -> None:
                await limiter.take(f"bench-{i % 100}", "bench")

            limited = await call_samples(take, min(iterations, 5_000))
            results["redis"]["rate_limit_check_p50_us"] = p50_us(limited)
            if private is None:  # someone else's Redis: leave nothing behind
                async for key in redis_store.client.scan_iter(match=prefix + "*", count=1000):
                    await redis_store.client.delete(key)
        finally:
            for store in stores.values():
                await store.close()
    finally:
        if private is not None:
            private.stop()
        shutil.rmtree(folder, ignore_errors=True)
    sqlite, redis = results["sqlite"], results["redis"]
    results["line"] = (
        f"decision p50 (warm caches), Redis store vs SQLite store: {redis['decision_p50_us']:.1f} µs vs "
        f"{sqlite['decision_p50_us']:.1f} µs (x{redis['decision_p50_us'] / sqlite['decision_p50_us']:.2f}); "
        f"cache-miss store read {redis['store_get_p50_us']:.0f} µs vs {sqlite['store_get_p50_us']:.0f} µs; "
        f"shared rate-limit check (Redis, when enabled) {redis['rate_limit_check_p50_us']:.0f} µs")
    log(results["line"])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=1_000, help="records in each store")
    parser.add_argument("--redis-url", help="use this Redis (keys under sg-bench-*:, removed after) instead of "
                                            "a private redis-server")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = asyncio.run(run(args.iterations, args.tokens, args.redis_url))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
