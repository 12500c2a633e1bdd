"""The gateway's own CPU per request, in process, without the network: where the time goes.

Drives the ASGI callables directly with a uvicorn-shaped scope and a stand-in upstream that
answers at once with the same small JSON body (the real `UpstreamClient.build_headers` still
runs): the bare pass-through of bench/baseline.py against the full `GatewayApp`, built from a
real configuration (keyring, SQLite store, shipped policy and routes, audit to a file), with
its background tasks running. The difference is the price of authorization + audit + metrics
in Python, free of the machine's network and scheduling noise that the HTTP numbers carry.

    bench/inprocess.py [--iterations 20000] [--profile]

`--profile` adds a cProfile of the gateway loop (top functions by own time).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from baseline import ScopegateClientPassThrough as PassThrough  # noqa: E402  (the canned upstream replaces its client)

import bench  # noqa: E402

BODY = bench.UPSTREAM_BODY.encode()


class CannedResponse:
    """Duck-types gateway.upstream.UpstreamResponse."""

    def __init__(self) -> None:
        self.status = 200
        self.headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
        self.content_length = len(BODY)
        self.started = time.perf_counter()
        self.ended = False

    async def next_chunk(self) -> bytes | None:
        if self.ended:
            return None
        self.ended = True
        return BODY

    async def chunks(self) -> AsyncIterator[bytes]:
        yield BODY

    async def read_all(self, limit: int) -> bytes:
        return BODY

    def release(self) -> None:
        pass


class CannedUpstream:
    """The real client's header rebuilding; an instant canned answer instead of the network."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def build_headers(self, *args: Any, **kwargs: Any) -> Any:
        return self.real.build_headers(*args, **kwargs)

    async def send(self, method: str, target: bytes, headers: Any, body: Any) -> CannedResponse:
        return CannedResponse()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def scope_for(token: str) -> dict[str, Any]:
    path = bench.PATH.encode()
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000), "scheme": "http", "method": "GET",
        "root_path": "", "path": bench.PATH, "raw_path": path, "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8080"), (b"authorization", f"Bearer {token}".encode()),
                    (b"user-agent", b"bench"), (b"accept", b"*/*")],
        "state": {}, "extensions": {"scopegate.request_target": path},
    }


async def drive(app: Any, scope: dict[str, Any], iterations: int) -> list[int]:
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    samples = [0] * iterations
    clock = time.perf_counter_ns
    for i in range(iterations):
        if i % 64 == 0:
            # Let the loop run its timers (the store-sync task keeps the token cache's lease fresh),
            # as it does between requests in a server; outside the timed part.
            await asyncio.sleep(0)
        t0 = clock()
        await app(dict(scope), receive, send)
        samples[i] = clock() - t0
    bad = [s for s in statuses if s != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} answers were not 200 (first: {bad[0]}); the comparison would be meaningless")
    return samples


async def run(iterations: int, profile: bool) -> dict[str, Any]:
    from gateway.app import GatewayApp
    from gateway.config import load_config
    from gateway.services import Services

    folder = Path(tempfile.mkdtemp(prefix="sg-inprocess-"))
    try:
        config_path = bench.write_gateway_config(folder, "http://127.0.0.1:9")
        token, _ = await asyncio.to_thread(bench.mint_tokens, config_path, 0)
        os.environ[bench.CREDENTIAL_ENV] = "bench-upstream-credential"
        services = Services.build(load_config(config_path))
        machines = services.machines
        gateway = GatewayApp(services)
        await services.start()
        baseline = PassThrough("http://127.0.0.1:9")
        await baseline.upstream.start()
        try:
            machines.upstream = CannedUpstream(machines.upstream)  # type: ignore[assignment]
            baseline.upstream = CannedUpstream(baseline.upstream)  # type: ignore[assignment]
            scope = scope_for(token)
            from gateway.core.audit import AuditLog

            real_audit, real_observe = machines.audit, services.metrics.observe
            silent_audit = AuditLog([])
            silent_audit.emit = lambda record: None  # type: ignore[method-assign]

            def restore() -> None:
                machines.audit, services.metrics.observe = real_audit, real_observe  # type: ignore[method-assign]

            def no_audit() -> None:
                machines.audit = silent_audit

            def no_metrics() -> None:
                services.metrics.observe = lambda *a, **k: None  # type: ignore[method-assign]

            def neither() -> None:
                no_audit()
                no_metrics()

            # (app, how to set it up): the gateway whole, then with one per-request duty switched
            # off at a time, for attribution.
            variants: dict[str, tuple[Any, Any]] = {
                "baseline": (baseline, restore), "gateway": (gateway, restore),
                "gateway without the audit record": (gateway, no_audit),
                "gateway without metrics": (gateway, no_metrics),
                "gateway without audit record and metrics": (gateway, neither),
            }
            for app in (baseline, gateway):  # warm-up
                await drive(app, scope, 2_000)
            rounds = 5
            p50s: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for round_index in range(rounds):
                # Interleaved, the order rotating; each variant keeps its best round (the lowest
                # p50), as timeit does: other work on a shared machine only ever adds time.
                for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                    app, setup = variants[name]
                    setup()
                    samples = sorted(await drive(app, scope, max(1_000, iterations // rounds)))
                    restore()
                    p50s[name].append(samples[len(samples) // 2] / 1000)
            best = {name: min(values) for name, values in p50s.items()}
            results: dict[str, Any] = {"iterations": iterations, "rounds": rounds, "p50s_us": p50s,
                                       "baseline_p50_us": best["baseline"], "gateway_p50_us": best["gateway"]}
            results["added_p50_us"] = results["gateway_p50_us"] - results["baseline_p50_us"]
            results["without"] = {name.removeprefix("gateway "): value for name, value in best.items()
                                  if name.startswith("gateway without")}
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                await drive(gateway, scope, iterations // 3)
                profiler.disable()
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
                results["profile"] = out.getvalue()
            return results
        finally:
            await baseline.upstream.real.close()  # type: ignore[attr-defined]
            await services.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30_000)
    parser.add_argument("--profile", action="store_true", help="add a cProfile of the gateway loop")
    args = parser.parse_args()
    import uvloop

    results = uvloop.run(run(args.iterations, args.profile))
    print(f"in process, stand-in upstream, best-of-{results['rounds']} p50 per request: "
          f"baseline {results['baseline_p50_us']:.1f} µs, "
          f"gateway {results['gateway_p50_us']:.1f} µs, added by the gateway {results['added_p50_us']:.1f} µs")
    for label, p50 in results["without"].items():
        print(f"  gateway {label}: {p50:.1f} µs ({results['gateway_p50_us'] - p50:.1f} µs less)")
    if "profile" in results:
        print(results["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
