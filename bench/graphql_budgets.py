"""The GraphQL surface's budgets (issue 13), in process, measured in one run.

1. decision p50 for a repeated document (flyctl's `ResolveImageForApp`): authenticate, read the
   JSON body, look the analyzed document up by hash, resolve the app from the variables, decide;
   budget <= 50 µs;
2. a first-seen document of flyctl's size (a new hash each time: parse + limits + full validation
   against Fly's schema + analysis); budget <= 2 ms;
3. hostile documents (an alias bomb, a fragment bomb, a depth bomb, a token flood), each refused
   with a cache miss; budget: no slower than a first-seen flyctl document;
4. whole requests through the ASGI app with an instant stand-in upstream: the gateway's GraphQL
   surface against the bare pass-through (bench/baseline.py) on `POST /graphql`; the ratio of their
   p50s, as req/s; budget >= 0.8x.

    bench/graphql_budgets.py [--iterations 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from baseline import ScopegateClientPassThrough as PassThrough  # noqa: E402  (the canned upstream replaces its client)
from inprocess import CannedUpstream  # noqa: E402

import bench  # noqa: E402
from gateway.errors import GatewayError  # noqa: E402

RESOLVE_IMAGE = ("query ($appName: String!, $imageRef: String!) { app(name: $appName) { id image(ref: $imageRef) "
                 "{ id digest ref compressedSize: compressedSizeFull manifest } } }")
VARIABLES = {"appName": "web-staging", "imageRef": "registry.fly.io/web-staging:deployment-01"}
COMPACT = ("query ($appName: String!) { appcompact:app(name: $appName) { id internalNumericId name hostname "
           "cnameTarget deployed network status appUrl platformVersion organization { id internalNumericId slug "
           "paidPlan } postgresAppRole: role { name } } }")


def hostile() -> dict[str, str]:
    aliases = "{ " + " ".join(f"a{i}: app(name: \"web-staging\") {{ id }}" for i in range(400)) + " }"
    fragments = " ".join(["fragment F0 on App { id name }"] + [f"fragment F{i} on App {{ ...F{i - 1} ...F{i - 1} }}"
                                                               for i in range(1, 40)])
    return {
        "alias bomb (400 aliases)": aliases,
        "fragment bomb (2^39 fields)": "{ app(name: \"web-staging\") { ...F39 } } " + fragments,
        "depth bomb (200 levels)": "{ app(name: \"web-staging\") { " + "a { " * 200 + "id" + " }" * 201 + " }",
        "token flood (4,000 tokens)": "{ app(name: \"web-staging\") { id " + "id " * 4000 + "} }",
        "oversized (64 KiB)": "{ app(name: \"web-staging\") { id } }" + " " * 65536,
    }


def p50(samples: list[int]) -> float:
    return sorted(samples)[len(samples) // 2] / 1000


async def run(iterations: int) -> dict[str, Any]:
    from gateway.app import GatewayApp
    from gateway.config import load_config
    from gateway.services import Services
    from gateway.surfaces.graphql.surface import GraphQLSurface, parse_requests

    folder = Path(tempfile.mkdtemp(prefix="sg-graphql-"))
    try:
        config_path = bench.write_gateway_config(folder, "http://127.0.0.1:9")
        token, _ = await asyncio.to_thread(bench.mint_tokens, config_path, 0)
        os.environ[bench.CREDENTIAL_ENV] = "bench-upstream-credential"
        services = Services.build(load_config(config_path))
        surface = next(s for s in services.surfaces if isinstance(s, GraphQLSurface))
        gateway = GatewayApp(services)
        await services.start()
        baseline = PassThrough("http://127.0.0.1:9")
        await baseline.upstream.start()
        try:
            out: dict[str, Any] = {}
            analyzer = surface.analyzer
            assert analyzer is not None
            body = json.dumps({"query": RESOLVE_IMAGE, "variables": VARIABLES}).encode()
            header = [f"Bearer {token}".encode()]
            clock = time.perf_counter_ns

            samples = []
            for _ in range(iterations):
                t0 = clock()
                claims = await services.authorizer.authenticate(header)
                ((query, variables),) = parse_requests(body)
                document = analyzer.analyze(query)
                ruling = services.authorizer.decide(claims, [check for _, check in surface.checks(document, variables)])
                samples.append(clock() - t0)
                assert ruling.allowed
            out["repeated_decision_p50_us"] = p50(samples)

            samples = []
            for i in range(max(200, iterations // 50)):
                text = f"# {i}\n{COMPACT}"  # a new hash: parsed, measured, validated, analyzed
                t0 = clock()
                analyzer.analyze(text)
                samples.append(clock() - t0)
            out["first_seen_p50_ms"] = p50(samples) / 1000

            out["hostile_ms"] = {}
            for name, text in hostile().items():
                samples = []
                for i in range(20):
                    t0 = clock()
                    try:
                        analyzer.analyze(f"# {i}\n{text}")
                        raise AssertionError(f"{name} was not refused")
                    except GatewayError:
                        samples.append(clock() - t0)
                out["hostile_ms"][name] = p50(samples) / 1000

            machines, rest_surface = services.machines, surface
            rest_surface.upstream = CannedUpstream(surface.upstream)  # type: ignore[assignment]
            machines.upstream = CannedUpstream(machines.upstream)  # type: ignore[assignment]
            baseline.upstream = CannedUpstream(baseline.upstream)  # type: ignore[assignment]
            scope = graphql_scope(token, len(body))
            for app in (baseline, gateway):
                await drive(app, scope, body, 2_000)
            best: dict[str, list[float]] = {"baseline": [], "gateway": []}
            for round_index in range(5):
                for name, app in ((("baseline", baseline), ("gateway", gateway)) if round_index % 2 == 0
                                  else (("gateway", gateway), ("baseline", baseline))):
                    best[name].append(p50(await drive(app, scope, body, max(1_000, iterations // 5))))
            out["baseline_p50_us"], out["gateway_p50_us"] = min(best["baseline"]), min(best["gateway"])
            out["rps_ratio"] = out["baseline_p50_us"] / out["gateway_p50_us"]
            return out
        finally:
            await getattr(baseline.upstream, "real", baseline.upstream).close()
            await services.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def graphql_scope(token: str, length: int) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000), "scheme": "http", "method": "POST",
        "root_path": "", "path": "/graphql", "raw_path": b"/graphql", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8080"), (b"authorization", f"Bearer {token}".encode()),
                    (b"content-type", b"application/json"), (b"content-length", str(length).encode())],
        "state": {}, "extensions": {"scopegate.request_target": b"/graphql"},
    }


async def drive(app: Any, scope: dict[str, Any], body: bytes, iterations: int) -> list[int]:
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    samples = [0] * iterations
    for i in range(iterations):
        if i % 64 == 0:
            await asyncio.sleep(0)
        t0 = time.perf_counter_ns()
        await app(dict(scope), receive, send)
        samples[i] = time.perf_counter_ns() - t0
    if any(status != 200 for status in statuses):
        raise RuntimeError(f"answers were not all 200: {sorted(set(statuses))}")
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    import uvloop

    r = uvloop.run(run(args.iterations))
    rows = [("repeated document, decision p50", f"{r['repeated_decision_p50_us']:.1f} µs", "<= 50 µs",
             r["repeated_decision_p50_us"] <= 50),
            ("first-seen flyctl document, p50", f"{r['first_seen_p50_ms']:.3f} ms", "<= 2 ms",
             r["first_seen_p50_ms"] <= 2)]
    rows += [(f"refused: {name}", f"{ms:.3f} ms", "<= 2 ms", ms <= 2) for name, ms in r["hostile_ms"].items()]
    rows.append(("POST /graphql req/s, gateway / bare pass-through (in process)",
                 f"{r['rps_ratio']:.2f}x ({r['gateway_p50_us']:.1f} / {r['baseline_p50_us']:.1f} µs p50)",
                 ">= 0.8x", r["rps_ratio"] >= 0.8))
    width = max(len(row[0]) for row in rows)
    for label, measured, budget, met in rows:
        print(f"{label:<{width}}  {measured:<34}  {budget:<9}  {'met' if met else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
