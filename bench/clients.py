"""The upstream HTTP client, chosen by measurement: the gateway's own (gateway/upstream/client.py),
aiohttp's and httpx, one run.

All clients talk to the same upstream (nginx when installed, else bench/upstream_server.py):

1. in process, the client alone: p50 latency of sequential requests (concurrency 1), and req/s
   plus the CPU time per request with 10 and 50 requests in flight (asyncio.gather over one
   shared client); httpx is measured with sniffio installed and, for the record, with sniffio
   hidden (httpcore then retries the failed import on every request);
2. inside the proxy: bench/baseline.py (the gateway's server stack) with `--client scopegate`,
   `--client aiohttp` and `--client httpx`, loaded by wrk (else the Python load generator) at concurrency 1,
   10 and 50, in interleaved rounds: req/s, p50/p99 and the proxy's CPU µs per request.

    bench/clients.py [--requests 3000] [--seconds 5] [--rounds 2] [--json out.json]

Writes bench/results/clients-latest.json and prints a table. Stops everything it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from loadgen import run_load, wrk_available  # noqa: E402

import bench  # noqa: E402

PATH = bench.PATH


async def client_alone(kind: str, url: str, requests: int) -> dict[str, Any]:
    """Sequential latency and concurrent throughput of one client against `url`."""
    if kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

        async def get() -> None:
            async with session.get(url) as response:
                await response.read()
                assert response.status == 200

        close = session.close
    elif kind == "scopegate":
        from urllib.parse import urlsplit

        from gateway.upstream.client import UpstreamClient
        from gateway.upstream.headers import OutgoingHeaders

        parts = urlsplit(url)
        own = UpstreamClient(f"{parts.scheme}://{parts.netloc}", auth_scheme="Bearer", credential="bench",
                             connect_timeout_s=5, read_timeout_s=30)
        await own.start()
        target = parts.path.encode()

        async def get() -> None:
            response = await own.send("GET", target, OutgoingHeaders(), None)
            try:
                await response.read_all(1 << 20)
            finally:
                response.release()
            assert response.status == 200

        close = own.close
    else:
        import httpx

        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000))

        async def get() -> None:
            response = await client.get(url)
            assert response.status_code == 200

        close = client.aclose
    try:
        for _ in range(200):
            await get()
        samples = []
        for _ in range(requests):
            t0 = time.perf_counter_ns()
            await get()
            samples.append(time.perf_counter_ns() - t0)
        samples.sort()
        out: dict[str, Any] = {"c1_p50_us": samples[len(samples) // 2] / 1000,
                               "c1_p99_us": samples[int(len(samples) * 0.99)] / 1000}
        for concurrency in (10, 50):
            per_task = max(1, requests // concurrency)

            async def worker(n: int = per_task) -> None:
                for _ in range(n):
                    await get()

            await asyncio.gather(*(worker(5) for _ in range(concurrency)))  # open the connections
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            done = per_task * concurrency
            out[f"c{concurrency}_rps"] = done / wall
            out[f"c{concurrency}_cpu_us_per_request"] = cpu * 1e6 / done
        return out
    finally:
        await close()


def client_alone_subprocess(kind: str, url: str, requests: int, hide_sniffio: bool = False) -> dict[str, Any]:
    """Each client in a fresh interpreter, so neither warms or pollutes the other."""
    code = ("import sys, json, asyncio\n"
            + ("sys.modules['sniffio'] = None\n" if hide_sniffio else "")
            + f"sys.path.insert(0, {str(HERE)!r}); sys.path.insert(0, {str(HERE.parent)!r})\n"
            "import uvloop\n"
            "from clients import client_alone\n"
            f"print('CLIENTJSON ' + json.dumps(uvloop.run(client_alone({kind!r}, {url!r}, {requests}))))\n")
    done = subprocess.run([bench.PYTHON, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("CLIENTJSON ")), None)
    if line is None:
        raise RuntimeError(f"client benchmark {kind} failed: {done.stderr.strip()[-2000:]}")
    return dict(json.loads(line[len("CLIENTJSON "):]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per in-process measurement")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per proxy load point")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per proxy load point")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "clients-latest.json")
    args = parser.parse_args()

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    folder = Path(tempfile.mkdtemp(prefix="sg-clients-"))
    procs = bench.Processes(folder)
    use_wrk = wrk_available()
    import aiohttp
    import httpx
    import sniffio

    results: dict[str, Any] = {"versions": {"aiohttp": aiohttp.__version__, "httpx": httpx.__version__,
                                            "sniffio": getattr(sniffio, "__version__", "?")},
                               "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
                               "load_generator": "wrk -t1" if use_wrk else "python aiohttp"}
    try:
        _upstream, upstream_url, results["upstream"] = bench.start_upstream(procs, folder, True)
        bench.log(f"upstream {results['upstream']}")
        alone: dict[str, Any] = {}
        for name, kind, hide in (("scopegate", "scopegate", False), ("aiohttp", "aiohttp", False),
                                 ("httpx", "httpx", False),
                                 ("httpx, sniffio hidden", "httpx", True)):
            alone[name] = client_alone_subprocess(kind, upstream_url + PATH, args.requests, hide)
            bench.log(f"  alone {name:22s} c=1 p50 {alone[name]['c1_p50_us']:6.0f} µs   c=10 "
                      f"{alone[name]['c10_rps']:7,.0f} req/s, {alone[name]['c10_cpu_us_per_request']:5.0f} µs CPU/req")
        results["alone"] = alone
        proxies: dict[str, tuple[bench.Proc, str]] = {}
        for kind in ("scopegate", "aiohttp", "httpx"):
            port = bench.free_port()
            proc = procs.start(f"proxy-{kind}", [bench.PYTHON, str(HERE / "baseline.py"), "--upstream", upstream_url,
                                                 "--port", str(port), "--client", kind])
            url = f"http://127.0.0.1:{port}"
            bench.wait_ready(proc, url + PATH)
            bench.check(run_load(url + PATH, concurrency=10, seconds=2, use_wrk=use_wrk), f"warm-up {kind}")
            proxies[kind] = (proc, url)
        runs: dict[str, dict[int, list[Any]]] = {k: {c: [] for c in bench.CONCURRENCIES} for k in proxies}
        for round_index in range(args.rounds):
            for c in bench.CONCURRENCIES:
                order = list(proxies)[round_index % 3:] + list(proxies)[:round_index % 3]
                for kind in order:
                    proc, url = proxies[kind]
                    result = bench.check(bench.measure(proc, url + PATH, concurrency=c, seconds=args.seconds,
                                                       use_wrk=use_wrk), f"proxy {kind} c={c}")
                    runs[kind][c].append(result)
                    bench.log(f"  proxy {kind:7s} c={c:<3d} {result.rps:7,.0f} req/s  "
                              f"p50 {result.p50_us / 1000:6.3f} ms"
                              f"  cpu {result.cpu_us_per_request:5.0f} µs/req")
        results["proxy"] = {k: {c: bench.median_result(runs[k][c]) for c in bench.CONCURRENCIES} for k in proxies}
        results["proxy_ratio"] = {c: statistics.median(a.rps / h.rps for a, h in zip(runs["aiohttp"][c],
                                                                                     runs["httpx"][c], strict=True))
                                  for c in bench.CONCURRENCIES}
        results["own_ratio"] = {c: statistics.median(o.rps / a.rps for o, a in zip(runs["scopegate"][c],
                                                                                  runs["aiohttp"][c], strict=True))
                                for c in bench.CONCURRENCIES}
    except KeyboardInterrupt:
        bench.log("interrupted")
        return 130
    except RuntimeError as exc:
        bench.log(f"failed: {exc}")
        return 1
    finally:
        procs.stop_all()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for name, m in results["alone"].items():
        rows.append([f"client alone: {name}", f"{m['c1_p50_us']:.0f} µs", f"{m['c10_rps']:,.0f}",
                     f"{m['c10_cpu_us_per_request']:.0f}", f"{m['c50_rps']:,.0f}",
                     f"{m['c50_cpu_us_per_request']:.0f}"])
    for kind, by_c in results["proxy"].items():
        rows.append([f"proxy (baseline.py): {kind}", f"{by_c[1]['p50_us']:.0f} µs",
                     f"{by_c[10]['rps']:,.0f}", f"{by_c[10]['cpu_us_per_request']:.0f}",
                     f"{by_c[50]['rps']:,.0f}", f"{by_c[50]['cpu_us_per_request']:.0f}"])
    text = bench.table(rows, ["what", "c=1 p50", "c=10 req/s", "c=10 CPU µs/req", "c=50 req/s", "c=50 CPU µs/req"])
    ratios = ", ".join(f"c={c} {r:.1f}x" for c, r in results["proxy_ratio"].items())
    text += f"\nproxy req/s, aiohttp / httpx (paired by round, median): {ratios}"
    own = ", ".join(f"c={c} {r:.2f}x" for c, r in results["own_ratio"].items())
    text += f"\nproxy req/s, the gateway's own client / aiohttp (paired by round, median): {own}"
    text += (f"\nversions: aiohttp {results['versions']['aiohttp']}, httpx {results['versions']['httpx']}, "
             f"sniffio {results['versions']['sniffio']}; upstream {results['upstream']}")
    results["table"] = text
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    bench.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
