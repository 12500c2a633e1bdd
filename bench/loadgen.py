"""Load generation for bench/run: wrk when installed, else a Python (aiohttp) closed-loop generator.

Both return the same summary: requests, seconds, req/s, p50/p90/p99 (µs), errors, non-2xx.
Both are closed-loop (each connection sends its next request when the previous answer is in),
with one keep-alive connection per unit of concurrency.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk.lua"


@dataclass
class LoadResult:
    tool: str
    url: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    errors: int
    non2xx: int
    cpu_us_per_request: float | None = None  # the server's CPU time per answer, filled by bench.py
    upstream_cpu_us_per_request: float | None = None  # the upstream's, while a proxy was measured (bench.py)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_load(url: str, *, concurrency: int, seconds: float, token: str | None = None,
             tokens: list[str] | None = None, paths: list[str] | None = None, limit: int | None = None,
             use_wrk: bool | None = None, body: bytes | None = None, headers: dict[str, str] | None = None,
             proxy: str | None = None) -> LoadResult:
    """Closed-loop load on `url` for `seconds` (or until `limit` responses, when given); with `body`,
    every request is a POST of it as application/json (a GraphQL request), else a GET. `headers` are
    added to every request; with `proxy` (http://host:port of a forward proxy) the connections go
    to the proxy and each request names `url` in absolute form (`GET http://host:port/path`)."""
    if use_wrk is None:
        use_wrk = wrk_available()
    if use_wrk:
        return _run_wrk(url, concurrency=concurrency, seconds=seconds, token=token, tokens=tokens, paths=paths,
                        limit=limit, body=body, headers=headers, proxy=proxy)
    return asyncio.run(_run_python(url, concurrency=concurrency, seconds=seconds, token=token, tokens=tokens,
                                   paths=paths, limit=limit, body=body, headers=headers, proxy=proxy))


def _run_wrk(url: str, *, concurrency: int, seconds: float, token: str | None, tokens: list[str] | None,
             paths: list[str] | None, limit: int | None, body: bytes | None = None,
             headers: dict[str, str] | None = None, proxy: str | None = None) -> LoadResult:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SG_")}
    with tempfile.TemporaryDirectory(prefix="sg-wrk-") as folder:
        if token:
            env["SG_TOKEN"] = token
        if tokens:
            (Path(folder) / "tokens").write_text("\n".join(tokens) + "\n")
            env["SG_TOKENS_FILE"] = str(Path(folder) / "tokens")
        if paths:
            (Path(folder) / "paths").write_text("\n".join(paths) + "\n")
            env["SG_PATHS_FILE"] = str(Path(folder) / "paths")
        if limit:
            env["SG_LIMIT"] = str(limit)
        if body is not None:
            (Path(folder) / "body").write_bytes(body)
            env["SG_BODY_FILE"] = str(Path(folder) / "body")
        if headers:
            (Path(folder) / "headers").write_text("".join(f"{k}: {v}\n" for k, v in headers.items()))
            env["SG_HEADERS_FILE"] = str(Path(folder) / "headers")
        connect = url
        if proxy:
            env["SG_REQUEST_TARGET"] = url  # the absolute URL goes in the request line, the socket to the proxy
            connect = proxy
        # One wrk thread: on this 2-core machine every cycle wrk takes is one the server loses.
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
                   "--latency", "-s", str(WRK_SCRIPT), connect]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60,
                              check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    data = json.loads(line[len("WRKJSON "):])
    secs = data["duration_us"] / 1e6
    errors = data["errors_connect"] + data["errors_read"] + data["errors_write"] + data["errors_timeout"]
    return LoadResult("wrk", url, concurrency, data["requests"], secs, data["requests"] / secs, data["p50_us"],
                      data["p90_us"], data["p99_us"], data["mean_us"], errors, data["non2xx"])


async def _run_python(url: str, *, concurrency: int, seconds: float, token: str | None, tokens: list[str] | None,
                      paths: list[str] | None, limit: int | None, body: bytes | None = None,
                      headers: dict[str, str] | None = None, proxy: str | None = None) -> LoadResult:
    import aiohttp
    from yarl import URL

    base = URL(url)
    origin = str(base.origin())
    latencies: list[int] = []
    counters = {"sent": 0, "errors": 0, "non2xx": 0}
    deadline = time.perf_counter() + seconds if not limit else time.perf_counter() + max(seconds, 3600)

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline and (not limit or counters["sent"] < limit):
            i = counters["sent"]
            counters["sent"] += 1
            sent = dict(headers or {}) if body is None else {**(headers or {}), "Content-Type": "application/json"}
            chosen = tokens[i % len(tokens)] if tokens else token
            if chosen:
                sent["Authorization"] = f"Bearer {chosen}"
            target = origin + paths[i % len(paths)] if paths else url
            start = time.perf_counter_ns()
            try:
                async with session.request("GET" if body is None else "POST", target, headers=sent,
                                           data=body, proxy=proxy) as response:
                    await response.read()
                    if not 200 <= response.status < 400:
                        counters["non2xx"] += 1
            except (TimeoutError, aiohttp.ClientError, OSError):
                counters["errors"] += 1
                continue
            latencies.append(time.perf_counter_ns() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] / 1000 if latencies else 0.0

    mean = sum(latencies) / len(latencies) / 1000 if latencies else 0.0
    return LoadResult("python-aiohttp", url, concurrency, len(latencies), elapsed, len(latencies) / elapsed,
                      pct(50), pct(90), pct(99), mean, counters["errors"], counters["non2xx"])
