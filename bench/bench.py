"""bench/run: Scopegate's performance benchmark, every number from one run on this machine.

Starts on loopback: a fast upstream (nginx when installed, else bench/upstream_server.py), the
baseline (bench/baseline.py: a bare pass-through proxy on the gateway's own server stack and
upstream client), and the gateway with full authorization (`scopegate serve`). Then measures,
with wrk (else a Python load generator):

1. req/s and p50/p99 at concurrency 1, 10, 50 for direct, baseline and gateway, and the peers
   (bench/peers.py: nginx as a credential-injecting reverse proxy, and superfly/tokenizer where its
   binary is here; `--skip peers` leaves them out) in the same interleaved rounds, medians over rounds;
2. the decision path alone, in process (bench/decision.py);
3. the gateway's RSS before and after a soak of N requests (default 100,000);
4. `scopegate serve --workers 2` against `--workers 1`;

prints the table with the ratios and the budgets of DESIGN section 14 / issue 7, and writes
JSON and a PNG chart to bench/results/. Every process it starts is stopped on exit, Ctrl-C or
failure. Durations: see `bench/run --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import profile_layers  # noqa: E402
import yaml  # noqa: E402
from loadgen import LoadResult, run_load, wrk_available  # noqa: E402
from peers import (  # noqa: E402
    CHECKED_TLS,
    CHECKED_UPSTREAM,
    NGINX_PROXY_CONF,
    PEERS,
    credential_is_safe,
    find_tokenizer,
    peer_ratio_lines,
    prepare_tokenizer,
    proxy_get,
    self_signed_cert,
)

PYTHON = sys.executable
CREDENTIAL_ENV = "SG_BENCH_UPSTREAM_TOKEN"
PATH = "/v1/apps/web-staging/machines"
GRANT = "deployer@app:web-staging"
CONCURRENCIES = (1, 10, 50)
TARGETS = ("direct", "baseline", "gateway")
UPSTREAM_BODY = '{"machines":[{"id":"148e","name":"web-1","state":"started","region":"ams"}]}'

# Budgets: DESIGN section 14 and issue 7.
DECISION_P50_US = 30.0
DECISION_FLAT_RATIO = 1.5  # "flat": the slowest size's p50 within 1.5x of the fastest's
RPS_RATIO_DESIGN = 0.85
RPS_RATIO_ISSUE = 1.2  # issue 19: a leaner forwarding path than the simplest proxy (issue 7 asked 1.0x)
P99_RATIO = 1.5  # issue 19: gateway p99 at c=50 within 1.5x of the baseline's
ADDED_P50_MS = 0.15  # issue 19 (DESIGN section 14: 0.3 ms)
ADDED_P50_MS_DESIGN = 0.3
RSS_GROWTH_MB = 50.0
WORKERS_RATIO = 1.7  # issue 19 (issue 7: 1.6x)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes -------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Processes:
    """Every process the bench starts, each in its own session so its whole group can be stopped."""

    folder: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.folder / f"{name}.log"
        handle = log_path.open("wb")
        popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=self.folder, start_new_session=True)
        handle.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the group this process leads (uvicorn/nginx workers too)
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)
        # Workers left behind by a leader that exited first.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)  # noqa: S310 (http://127.0.0.1 only)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback only)
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(proc: Proc, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            status, _ = http_get(url, timeout=1.0)
            if status < 500:
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not become ready at {url} within {timeout:.0f}s:\n{proc.tail()}")


def rss_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group `pgid` (a server and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # fields[0] is the state (3rd field of stat); pgrp is the 5th field, utime/stime the 14th/15th.
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def measure(proc: Proc | None, url: str, upstream: Proc | None = None, **load: Any) -> LoadResult:
    """run_load, plus the server's CPU time per answered request (robust to a noisy machine), and the
    upstream's when `upstream` is given (what a proxy costs the server behind it)."""
    before = group_cpu_s(proc.pid) if proc is not None else 0.0
    upstream_before = group_cpu_s(upstream.pid) if upstream is not None else 0.0
    result = run_load(url, **load)
    if proc is not None:
        result.cpu_us_per_request = (group_cpu_s(proc.pid) - before) * 1e6 / max(result.requests, 1)
    if upstream is not None:
        result.upstream_cpu_us_per_request = ((group_cpu_s(upstream.pid) - upstream_before) * 1e6
                                              / max(result.requests, 1))
    return result


# --- the servers -----------------------------------------------------------------------------------


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {folder}/nginx-body;
    proxy_temp_path {folder}/nginx-proxy;
    fastcgi_temp_path {folder}/nginx-fastcgi;
    uwsgi_temp_path {folder}/nginx-uwsgi;
    scgi_temp_path {folder}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
{extra}}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def start_upstream(procs: Processes, folder: Path, use_nginx: bool, extra: str = "") -> tuple[Proc, str, str]:
    """`extra`: more server blocks for the nginx upstream's http {} (the peers' checked ports)."""
    port = free_port()
    nginx = nginx_binary()
    if use_nginx and nginx:
        conf = folder / "nginx.conf"
        conf.write_text(NGINX_CONF.format(folder=folder, port=port, body=UPSTREAM_BODY, extra=extra))
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr.strip()
        proc = procs.start("nginx", [nginx, "-p", str(folder), "-e", str(folder / "nginx-error.log"),
                                     "-c", str(conf)])
        kind = f"nginx ({version.split('/')[-1]}, 1 worker, fixed JSON body)"
    else:
        proc = procs.start("upstream", [PYTHON, str(HERE / "upstream_server.py"), "--port", str(port)])
        kind = "bench/upstream_server.py (asyncio + uvloop, fixed JSON body)"
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + PATH)
    return proc, url, kind


def write_gateway_config(folder: Path, upstream_url: str) -> Path:
    document = {
        "upstream": {"url": upstream_url, "token_env": CREDENTIAL_ENV, "graphql_url": upstream_url + "/graphql"},
        "policy": {"model": str(REPO / "policies/model.conf"), "policy": str(REPO / "policies/policy.csv")},
        "routes": [str(REPO / "policies/routes/fly-machines.yaml")],
        "environments": {"rules": [{"app": "*-staging", "env": "staging"}, {"app": "*-prod", "env": "production"}],
                         "default": "development"},
        "tokens": {"keyring": "keyring.json"},
        "store": {"url": "sqlite:///state.db"},
        "audit": {"sinks": ["file:audit.jsonl"]},
    }
    path = folder / "scopegate.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def mint_tokens(config_path: Path, soak_tokens: int) -> tuple[str, list[str]]:
    from gateway.cli.local import LocalAdmin
    from gateway.config import load_config
    from gateway.core.keyring import Keyring

    config = load_config(config_path)
    Keyring.generate(config.tokens_keyring).save()

    async def run() -> tuple[str, list[str]]:
        admin = LocalAdmin.open(config)
        try:
            main = await admin.registry.mint(grants=[GRANT], ttl_s=86400, name="bench-deploy", subject="bench:ci")
            soak = [await admin.registry.mint(grants=["deployer@app:soak-*"], ttl_s=86400, name=f"bench-soak-{i}",
                                              subject=f"bench:soak:{i}") for i in range(soak_tokens)]
        finally:
            await admin.close()
        return main.token, [m.token for m in soak]

    return asyncio.run(run())


def start_gateway(procs: Processes, name: str, config_path: Path, workers: int) -> tuple[Proc, str]:
    port = free_port()
    env = dict(os.environ)
    env[CREDENTIAL_ENV] = os.environ.get(CREDENTIAL_ENV, "bench-upstream-credential")
    env.pop("SCOPEGATE_CONFIG", None)
    # `scopegate serve ...`: the console script's entry point, run from this checkout (not from
    # wherever an editable install points), so the bench measures the tree it lives in.
    launcher = (f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.argv[0] = 'scopegate'; "
                "from gateway.cli.main import main; sys.exit(main())")
    command = [PYTHON, "-c", launcher, "serve", "--config", str(config_path), "--host", "127.0.0.1",
               "--port", str(port),
                "--workers", str(workers)]
    proc = procs.start(name, command, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + "/_gateway/readyz", timeout=60)
    return proc, url


# --- the peers -----------------------------------------------------------------------------------------


@dataclass
class PeerPlan:
    """What the peers need before the upstream starts: its checked server blocks and their ports."""

    credential: str
    checked_port: int = 0
    tls_port: int = 0
    cert: Path | None = None
    tokenizer: Path | None = None
    tokenizer_from: str = ""
    extra: str = ""
    not_measured: dict[str, str] = field(default_factory=dict)  # peer -> why not


@dataclass
class PeerTargets:
    urls: dict[str, str] = field(default_factory=dict)
    servers: dict[str, Proc] = field(default_factory=dict)
    load_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_load arguments per peer
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # what each is, for the JSON and the report


def plan_peers(folder: Path, use_nginx: bool, credential: str) -> PeerPlan:
    plan = PeerPlan(credential)
    if not use_nginx or nginx_binary() is None:
        for peer in PEERS:
            plan.not_measured[peer] = "needs nginx as the upstream (--no-nginx given, or nginx is not installed)"
        return plan
    if not credential_is_safe(credential):
        for peer in PEERS:
            plan.not_measured[peer] = f"${CREDENTIAL_ENV} holds characters the peers' configurations would need escaped"
        return plan
    plan.checked_port = free_port()
    tls = ""
    plan.tokenizer, plan.tokenizer_from = find_tokenizer(REPO)
    if plan.tokenizer is None:
        plan.not_measured["tokenizer"] = f"not built here ({plan.tokenizer_from})"
    else:
        try:
            plan.cert, key = self_signed_cert(folder)
        except Exception as exc:  # an odd `cryptography`: tokenizer only needs it, the run goes on
            plan.not_measured["tokenizer"] = f"no TLS certificate for its upstream: {exc}"
            plan.tokenizer = None
        else:
            plan.tls_port = free_port()
            tls = CHECKED_TLS.format(tls_port=plan.tls_port, cert=plan.cert, key=key)
    plan.extra = CHECKED_UPSTREAM.format(plain_port=plan.checked_port, tls=tls, credential=credential,
                                         body=UPSTREAM_BODY)
    return plan


def start_peers(procs: Processes, folder: Path, plan: PeerPlan, token: str) -> PeerTargets:
    """Starts nginx-proxy and tokenizer (where planned) and checks each really injects the credential:
    the checked upstream answers 401 without it. A peer that fails its check is left out, and says why."""
    peers = PeerTargets()
    for peer, reason in plan.not_measured.items():
        peers.info[peer] = {"measured": False, "reason": reason}
    if not plan.checked_port:
        return peers
    checked = f"http://127.0.0.1:{plan.checked_port}"
    code, body = http_get(checked + PATH, token)  # the client's own token is not the credential
    if code != 401:
        raise RuntimeError(f"the checked upstream answered {code} to a request without the credential "
                           f"(expected 401): {body[:200]!r}")
    nginx = nginx_binary()
    assert nginx is not None
    port = free_port()
    conf = folder / "nginx-proxy.conf"
    conf.write_text(NGINX_PROXY_CONF.format(folder=folder, port=port, upstream_port=plan.checked_port,
                                            credential=plan.credential))
    proc = procs.start("nginx-proxy", [nginx, "-p", str(folder), "-e", str(folder / "nginx-proxy-error.log"),
                                       "-c", str(conf)])
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + PATH)
    code, body = http_get(url + PATH, token)
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr.strip()
    if code == 200 and body.decode(errors="replace") == UPSTREAM_BODY:
        peers.urls["nginx-proxy"], peers.servers["nginx-proxy"] = url, proc
        peers.info["nginx-proxy"] = {
            "measured": True, "version": f"nginx {version.split('/')[-1]}",
            "what": "reverse proxy, 1 worker, a keep-alive pool of 64 connections to the upstream, no client "
                    "authentication",
            "rule": f'proxy_set_header Authorization "Bearer <credential>" (${CREDENTIAL_ENV}) on every request'}
    else:
        procs.stop(proc)
        peers.info["nginx-proxy"] = {
            "measured": False, "reason": f"answered {code} (expected 200 with the upstream's body): {body[:200]!r}"}
    if plan.tokenizer is None or plan.cert is None:
        return peers
    try:
        setup = prepare_tokenizer(plan.tokenizer, plan.credential, f"127.0.0.1:{plan.tls_port}")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        peers.info["tokenizer"] = {"measured": False, "reason": f"{plan.tokenizer_from}: {exc}"}
        return peers
    port = free_port()
    proc = procs.start("tokenizer", [str(plan.tokenizer), "serve"], env=setup.env(port, plan.cert))
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/")  # not a proxy request: 400, "not that kind of server"
    except RuntimeError as exc:
        procs.stop(proc)
        peers.info["tokenizer"] = {"measured": False, "reason": str(exc)}
        return peers
    target = f"http://127.0.0.1:{plan.tls_port}"  # http: tokenizer itself dials the upstream over TLS
    code, body = proxy_get(port, target + PATH, setup.headers)
    unauthenticated, _ = proxy_get(port, target + PATH,
                                   {k: v for k, v in setup.headers.items() if k != "Proxy-Authorization"})
    if code != 200 or body.decode(errors="replace") != UPSTREAM_BODY or unauthenticated != 407:
        procs.stop(proc)
        peers.info["tokenizer"] = {"measured": False, "reason": (
            f"answered {code} with the sealed secret (expected 200 with the upstream's body: {body[:200]!r}) and "
            f"{unauthenticated} without Proxy-Authorization (expected 407); log: {proc.tail(5)}")}
        return peers
    peers.urls["tokenizer"], peers.servers["tokenizer"] = target, proc
    peers.load_options["tokenizer"] = {"token": None, "headers": setup.headers, "proxy": f"http://127.0.0.1:{port}"}
    peers.info["tokenizer"] = {
        "measured": True, "version": setup.version, "binary": plan.tokenizer_from,
        "what": "Fly's forward proxy, as shipped: Go (GOMAXPROCS = all cores); `Connection: close` on every answer "
                "(the client reconnects per request); a new TLS connection to the upstream per request",
        "rule": (f"sealed secret {{inject_processor: {{token: <credential>}}, bearer_auth: {{digest: sha256(<client "
                 f"secret>)}}, allowed_hosts: [{setup.upstream_host}]}}: sets Authorization: Bearer <credential> "
                 f"(${CREDENTIAL_ENV}) for a client presenting Proxy-Authorization: Bearer <client secret>, towards "
                 "that host only")}
    return peers


# --- measuring ---------------------------------------------------------------------------------------


def check(result: LoadResult, what: str) -> LoadResult:
    if result.requests == 0 or result.errors or result.non2xx:
        raise RuntimeError(f"{what}: {result.requests} answers, {result.errors} socket errors, "
                           f"{result.non2xx} non-2xx answers; the numbers would be meaningless")
    return result


def median_result(results: list[LoadResult]) -> dict[str, Any]:
    cpu = [r.cpu_us_per_request for r in results if r.cpu_us_per_request is not None]
    upstream_cpu = [r.upstream_cpu_us_per_request for r in results if r.upstream_cpu_us_per_request is not None]
    return {
        "rps": statistics.median(r.rps for r in results),
        "p50_us": statistics.median(r.p50_us for r in results),
        "p99_us": statistics.median(r.p99_us for r in results),
        "cpu_us_per_request": statistics.median(cpu) if cpu else None,
        "upstream_cpu_us_per_request": statistics.median(upstream_cpu) if upstream_cpu else None,
        "rounds": [r.to_json() for r in results],
    }


def http_matrix(urls: dict[str, str], servers: dict[str, Proc], token: str, seconds: float, rounds: int,
                use_wrk: bool, load_options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`load_options`: run_load arguments of a target that override the defaults (a forward proxy's)."""
    runs: dict[str, dict[int, list[LoadResult]]] = {t: {c: [] for c in CONCURRENCIES} for t in urls}
    names = list(urls)
    for round_index in range(rounds):
        for c in CONCURRENCIES:
            # Rotate the order each round so no target always runs right after the same one.
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for target in order:
                options = {"token": token, **(load_options or {}).get(target, {})}
                upstream = servers.get("direct") if target != "direct" else None
                result = check(measure(servers.get(target), urls[target] + PATH, upstream, concurrency=c,
                                       seconds=seconds, use_wrk=use_wrk, **options), f"{target} c={c}")
                runs[target][c].append(result)
                cpu = "" if result.cpu_us_per_request is None else f"  cpu {result.cpu_us_per_request:5.0f} µs/req"
                log(f"  round {round_index + 1}/{rounds} {target:11s} c={c:<3d} {result.rps:9,.0f} req/s  "
                    f"p50 {result.p50_us / 1000:6.3f} ms  p99 {result.p99_us / 1000:6.3f} ms{cpu}")
    matrix: dict[str, Any] = {t: {c: median_result(runs[t][c]) for c in CONCURRENCIES} for t in urls}
    # Ratios paired within a round (the two runs closest in time), then the median over rounds:
    # steadier than a ratio of medians when other work comes and goes on the machine.
    matrix["paired_ratio"] = {c: statistics.median(g.rps / b.rps for g, b in zip(runs["gateway"][c],
                                                                                     runs["baseline"][c], strict=True))
                              for c in CONCURRENCIES}
    # The gateway against each peer measured, paired the same way.
    peer_ratio = {peer: {c: statistics.median(g.rps / p.rps for g, p in zip(runs["gateway"][c], runs[peer][c],
                                                                             strict=True))
                         for c in CONCURRENCIES}
                  for peer in PEERS if peer in runs}
    if peer_ratio:
        matrix["peer_ratio"] = peer_ratio
    return matrix


GRAPHQL_CONCURRENCIES = (1, 10)
GRAPHQL_RATIO = 0.8
# flyctl's ResolveImageForApp, as `fly deploy --image` sends it.
GRAPHQL_BODY = json.dumps({
    "query": "query ($appName: String!, $imageRef: String!) { app(name: $appName) { id image(ref: $imageRef) "
             "{ id digest ref compressedSize: compressedSizeFull manifest } } }",
    "variables": {"appName": "web-staging", "imageRef": "registry.fly.io/web-staging:deployment-01"}}).encode()


def graphql_matrix(urls: dict[str, str], servers: dict[str, Proc], token: str, seconds: float, rounds: int,
                   use_wrk: bool) -> dict[str, Any]:
    """POST /graphql through the gateway (parse cache, app check, decision) and the bare pass-through."""
    runs: dict[str, dict[int, list[LoadResult]]] = {t: {c: [] for c in GRAPHQL_CONCURRENCIES} for t in urls}
    for round_index in range(rounds):
        for c in GRAPHQL_CONCURRENCIES:
            for target in (list(urls) if round_index % 2 == 0 else list(reversed(urls))):
                result = check(measure(servers[target], urls[target] + "/graphql", concurrency=c, seconds=seconds,
                                       token=token, use_wrk=use_wrk, body=GRAPHQL_BODY), f"graphql {target} c={c}")
                runs[target][c].append(result)
                log(f"  round {round_index + 1}/{rounds} graphql {target:9s} c={c:<3d} {result.rps:9,.0f} req/s  "
                    f"p50 {result.p50_us / 1000:6.3f} ms")
    matrix: dict[str, Any] = {t: {c: median_result(runs[t][c]) for c in GRAPHQL_CONCURRENCIES} for t in urls}
    matrix["paired_ratio"] = {c: statistics.median(g.rps / b.rps for g, b in zip(runs["gateway"][c],
                                                                                     runs["baseline"][c], strict=True))
                              for c in GRAPHQL_CONCURRENCIES}
    return matrix


def soak(gateway: Proc, url: str, tokens: list[str], requests: int, use_wrk: bool,
         rps_estimate: float, concurrency: int) -> dict[str, Any]:
    """RSS before and after `requests` requests, rotating over many tokens and paths (apps)."""
    paths = [f"/v1/apps/soak-{i}/machines" for i in range(1000)]
    # A short warm-up first, so "before" is the settled process and not its import-time size.
    check(run_load(url + paths[0], concurrency=concurrency, seconds=2, tokens=tokens, paths=paths,
                   use_wrk=use_wrk), "soak warm-up")
    before = rss_kib(gateway.pid)
    started = time.monotonic()
    done, chunks, rps = 0, 0, max(rps_estimate, 50.0)
    samples = [before["VmRSS"]]
    while done < requests:
        # wrk runs for a duration, not a count: chunks sized from the measured rate, until enough.
        remaining = requests - done
        seconds = min(30.0, max(2.0, remaining / rps))
        result = check(run_load(url + paths[0], concurrency=concurrency, seconds=seconds, tokens=tokens, paths=paths,
                                limit=None if use_wrk else remaining, use_wrk=use_wrk), "soak")
        done += result.requests
        rps = result.rps
        chunks += 1
        samples.append(rss_kib(gateway.pid)["VmRSS"])
        log(f"  soak {done:,}/{requests:,} requests, {rps:,.0f} req/s, RSS {samples[-1] / 1024:.1f} MiB")
    after = rss_kib(gateway.pid)
    return {"requests": done, "concurrency": concurrency, "seconds": round(time.monotonic() - started, 1),
            "rps": done / (time.monotonic() - started), "distinct_tokens": len(tokens), "distinct_paths": len(paths),
            "rss_before_mib": before["VmRSS"] / 1024, "rss_after_mib": after["VmRSS"] / 1024,
            "rss_growth_mib": (after["VmRSS"] - before["VmRSS"]) / 1024, "peak_rss_mib": after["VmHWM"] / 1024,
            "rss_samples_mib": [round(v / 1024, 1) for v in samples]}


def workers_compare(urls: dict[str, str], servers: dict[str, Proc], token: str, seconds: float, rounds: int,
                    use_wrk: bool, concurrency: int) -> dict[str, Any]:
    runs: dict[str, list[LoadResult]] = {name: [] for name in urls}
    for round_index in range(rounds):
        order = list(urls) if round_index % 2 == 0 else list(reversed(urls))
        for name in order:
            result = check(measure(servers[name], urls[name] + PATH, concurrency=concurrency, seconds=seconds,
                                   token=token, use_wrk=use_wrk), f"{name} c={concurrency}")
            runs[name].append(result)
            log(f"  round {round_index + 1}/{rounds} {name:9s} c={concurrency:<3d} {result.rps:9,.0f} req/s  "
                f"cpu {result.cpu_us_per_request:5.0f} µs/req")
    out: dict[str, Any] = {name: median_result(results) for name, results in runs.items()}
    out["concurrency"] = concurrency
    out["paired_ratio"] = statistics.median(b.rps / a.rps for a, b in zip(runs["workers1"], runs["workers2"],
                                                                           strict=True))
    return out


def profile(gateway: Proc, url: str, token: str, seconds: float, use_wrk: bool, out: Path) -> list[str]:
    """py-spy samples of the gateway under load (c=10): collapsed stacks to `out`, top frames back."""
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
    if spy is None:
        log("--profile: py-spy is not installed (`.venv/bin/pip install py-spy`); skipped")
        return []
    recorder = subprocess.Popen([spy, "record", "-p", str(gateway.pid), "-d", str(max(2, round(seconds))), "-r", "250",
                                 "-f", "raw", "-o", str(out), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(0.5)
        run_load(url + PATH, concurrency=10, seconds=seconds, token=token, use_wrk=use_wrk)
        recorder.wait(timeout=seconds + 60)
    finally:
        if recorder.poll() is None:
            os.killpg(recorder.pid, signal.SIGKILL)
            recorder.wait()
    if not out.exists():
        log(f"--profile: py-spy wrote nothing ({(recorder.stderr.read() if recorder.stderr else b'').decode()[-300:]})")
        return []
    own: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frame = stack.split(";")[-1]
        own[frame] = own.get(frame, 0) + n
    top = sorted(own.items(), key=lambda kv: -kv[1])[:15]
    return [f"{100 * n / total:5.1f}%  {frame}" for frame, n in top]


def diagnose(results: dict[str, Any]) -> list[str]:
    """Plain-language notes on patterns the numbers show."""
    notes = []
    http = results["http"]
    g1, b1 = http["gateway"][1]["p50_us"], http["baseline"][1]["p50_us"]
    if g1 > 20_000 and b1 < 5_000:
        notes.append(
            f"gateway p50 at c=1 is {g1 / 1000:.0f} ms against {b1 / 1000:.2f} ms for the baseline: a ~40 ms stall per "
            "keep-alive request is the signature of Nagle's algorithm meeting the client's delayed ACK (headers and "
            "body leave in two writes on a socket without TCP_NODELAY). `scopegate serve` (one worker) runs "
            "asyncio.run(server.serve(sockets=[sock])), which ignores uvicorn's loop='auto' (no uvloop) and, on the "
            "pre-bound socket, asyncio does not set TCP_NODELAY. See docs/performance.md.")
    if "workers" in results:
        w = results["workers"]
        cpus = results["machine"]["cpus"] or 1
        if w["paired_ratio"] > max(2.0, float(cpus)):
            notes.append(f"--workers 2 is {w['paired_ratio']:.1f}x --workers 1 on {cpus} cores, more than two "
                         "processes can give: the two start paths do not serve alike (multi-worker runs uvicorn's "
                         "Server.run, with uvloop and TCP_NODELAY; one worker runs asyncio.run(server.serve(...))).")
    return notes


# --- the report ----------------------------------------------------------------------------------------


def status(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def budget_lines(results: dict[str, Any]) -> list[dict[str, str]]:
    lines: list[dict[str, str]] = []
    http = results["http"]
    decision = results.get("decision")
    if decision:
        hot = decision["hot"]
        worst = max(hot, key=lambda r: r["p50_us"])
        best = min(hot, key=lambda r: r["p50_us"])
        lines.append({"metric": "decision p50, warm caches (worst of the token x policy grid)",
                      "value": f"{worst['p50_us']:.1f} µs ({worst['tokens']:,} tokens, "
                               f"{worst['policy_lines']:,} lines)",
                      "budget": f"<= {DECISION_P50_US:.0f} µs", "status": status(worst["p50_us"] <= DECISION_P50_US)})
        ratio = worst["p50_us"] / best["p50_us"]
        lines.append({"metric": "decision p50 flat: slowest / fastest size",
                      "value": f"{ratio:.2f}x ({best['p50_us']:.1f} .. {worst['p50_us']:.1f} µs)",
                      "budget": f"<= {DECISION_FLAT_RATIO:.1f}x", "status": status(ratio <= DECISION_FLAT_RATIO)})
        if decision["working_set"]:
            row = max(decision["working_set"], key=lambda r: r["tokens"])
            lines.append({"metric": f"decision p50, all {row['tokens']:,} tokens in rotation",
                          "value": f"{row['p50_us']:.1f} µs",
                          "budget": f"<= {DECISION_P50_US:.0f} µs", "status": status(row["p50_us"] <= DECISION_P50_US)})
    for c in CONCURRENCIES:
        g, b = http["gateway"][c]["rps"], http["baseline"][c]["rps"]
        ratio = http["paired_ratio"][c]
        if ratio >= RPS_RATIO_ISSUE:
            verdict = "met"
        elif ratio >= RPS_RATIO_DESIGN:
            verdict = f"met §14; issue 19 gap {RPS_RATIO_ISSUE - ratio:.2f}"
        else:
            verdict = f"NOT MET (gap {RPS_RATIO_ISSUE - ratio:.2f})"
        lines.append({"metric": f"gateway / baseline req/s, c={c}", "value": f"{ratio:.2f}x ({g:,.0f} / {b:,.0f})",
                      "budget": f">= {RPS_RATIO_ISSUE:.1f}x issue 19 (§14: {RPS_RATIO_DESIGN:.2f}x)",
                      "status": verdict})
    gp99, bp99 = http["gateway"][50]["p99_us"], http["baseline"][50]["p99_us"]
    lines.append({"metric": "p99 at c=50, gateway / baseline", "value": f"{gp99 / bp99:.2f}x ({gp99 / 1000:.1f} / "
                                                                     f"{bp99 / 1000:.1f} ms)",
                  "budget": f"<= {P99_RATIO}x issue 19", "status": status(gp99 / bp99 <= P99_RATIO)})
    gcpu, bcpu = http["gateway"][10]["cpu_us_per_request"], http["baseline"][10]["cpu_us_per_request"]
    if gcpu and bcpu:
        lines.append({"metric": "server CPU per request, gateway / baseline, c=10",
                      "value": f"{gcpu / bcpu:.2f}x ({gcpu:.0f} / {bcpu:.0f} µs)",
                      "budget": f"info (<= {1 / RPS_RATIO_DESIGN:.2f}x for 0.85x req/s)", "status": "info"})
    direct = http["direct"][1]["p50_us"] / 1000
    gateway = http["gateway"][1]["p50_us"] / 1000
    baseline = http["baseline"][1]["p50_us"] / 1000
    lines.append({"metric": "added p50 at c=1: gateway - direct", "value": f"{gateway - direct:.3f} ms",
                  "budget": f"<= {ADDED_P50_MS} ms issue 19 (§14: {ADDED_P50_MS_DESIGN} ms)",
                  "status": status(gateway - direct <= ADDED_P50_MS)})
    lines.append({"metric": "added p50 at c=1: baseline - direct (server stack alone)",
                  "value": f"{baseline - direct:.3f} ms", "budget": "info", "status": "info"})
    lines.append({"metric": "added p50 at c=1: gateway - baseline (authorization alone)",
                  "value": f"{gateway - baseline:.3f} ms", "budget": "info", "status": "info"})
    if "soak" in results:
        s = results["soak"]
        lines.append({"metric": f"RSS growth over a {s['requests']:,}-request soak",
                      "value": f"{s['rss_growth_mib']:+.1f} MiB ({s['rss_before_mib']:.1f} -> "
                               f"{s['rss_after_mib']:.1f})",
                      "budget": f"< {RSS_GROWTH_MB:.0f} MB",
                      "status": status(s["rss_growth_mib"] * 1.048576 < RSS_GROWTH_MB)})
    if "workers" in results:
        w = results["workers"]
        ratio = w["paired_ratio"]
        verdict = status(ratio >= WORKERS_RATIO)
        if ratio > max(2.0, float(results["machine"]["cpus"] or 1)):
            verdict = "suspect (see note)"  # more than the cores can give: the two paths differ
        lines.append({"metric": f"--workers 2 / --workers 1 req/s, c={w['concurrency']}",
                      "value": f"{ratio:.2f}x ({w['workers2']['rps']:,.0f} / {w['workers1']['rps']:,.0f})",
                      "budget": f">= {WORKERS_RATIO}x", "status": verdict})
    if "graphql" in results:
        g = results["graphql"]
        for c in GRAPHQL_CONCURRENCIES:
            ratio = g["paired_ratio"][c]
            lines.append({"metric": f"GraphQL req/s, gateway / baseline, c={c} (issue 13)",
                          "value": f"{ratio:.2f}x ({g['gateway'][c]['rps']:,.0f} / {g['baseline'][c]['rps']:,.0f})",
                          "budget": f">= {GRAPHQL_RATIO}x", "status": status(ratio >= GRAPHQL_RATIO)})
    return lines


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def measured_targets(http: dict[str, Any]) -> list[str]:
    return [t for t in (*TARGETS, *PEERS) if t in http]


def peers_report(results: dict[str, Any]) -> list[str]:
    """What each peer is and injects, why one is missing, and the gateway's req/s against each."""
    peers = results.get("peers")
    if not peers:
        return []
    lines = [""]
    for peer in PEERS:
        info = peers.get(peer)
        if info is None:
            continue
        if not info["measured"]:
            lines.append(f"{peer}: {info['reason']}" if info["reason"].startswith("not built here")
                         else f"{peer}: not measured: {info['reason']}")
            continue
        lines.append(f"{peer}: {info['version']} — {info['what']}")
        lines.append(f"  injection rule: {info['rule']}")
    http = results["http"]
    for peer, ratios in http.get("peer_ratio", {}).items():
        lines.append(f"gateway / {peer} req/s: " + ", ".join(f"c={c} {ratios[c]:.2f}x" for c in CONCURRENCIES))
    # What each proxy costs the upstream behind it (tokenizer: a TLS handshake and a connection per request).
    c = 10
    upstream_cpu = {t: http[t][c].get("upstream_cpu_us_per_request") for t in measured_targets(http) if t != "direct"}
    if http.get("peer_ratio") and all(upstream_cpu.values()):
        lines.append(f"upstream CPU per request behind each proxy, c={c}: "
                     + ", ".join(f"{t} {v:.0f} µs" for t, v in upstream_cpu.items())
                     + f" (direct: {http['direct'][c]['cpu_us_per_request']:.0f} µs)")
    return lines


def report(results: dict[str, Any]) -> str:
    http = results["http"]
    parts = [f"Scopegate bench — {results['started']} — {results['machine']['cpus']} CPUs, "
             f"load generator {results['load_generator']}, upstream {results['upstream']}",
             f"{results['settings']['seconds']:g}s per point, {results['settings']['rounds']} round(s), medians",
             ""]
    rows = []
    for c in CONCURRENCIES:
        for target in measured_targets(http):
            m = http[target][c]
            cpu = m.get("cpu_us_per_request")
            rows.append([f"c={c}", target, f"{m['rps']:,.0f}", f"{m['p50_us'] / 1000:.3f}", f"{m['p99_us'] / 1000:.3f}",
                         f"{m['rps'] / http['baseline'][c]['rps']:.2f}", "-" if cpu is None else f"{cpu:.0f}"])
    parts.append(table(rows, ["conc", "target", "req/s", "p50 ms", "p99 ms", "x baseline", "server cpu µs/req"]))
    parts.append("(req/s, p50, p99: medians over rounds; budget ratios below: median of ratios paired within a round)")
    parts += peers_report(results)
    decision = results.get("decision")
    if decision:
        parts.append("")
        sizes = sorted({r["policy_lines"] for r in decision["hot"]})
        rows = []
        for tokens in sorted({r["tokens"] for r in decision["hot"]}):
            cells = {r["policy_lines"]: r for r in decision["hot"] if r["tokens"] == tokens}
            ws = next((r for r in decision["working_set"] if r["tokens"] == tokens), None)
            rows.append([f"{tokens:,}", *[f"{cells[s]['p50_us']:.1f} / {cells[s]['p99_us']:.1f}" for s in sizes],
                         f"{ws['p50_us']:.1f}" if ws else "-"])
        parts.append("decision path p50 / p99 µs (hot token; last column: every token of the store in turn, "
                     "1,000 policy lines)")
        parts.append(table(rows, ["tokens", *[f"{s:,} lines" for s in sizes], "all tokens p50"]))
        u = decision["uncached"]
        parts.append("uncached, for context: Ed25519 verify p50 {:.0f} µs; casbin enforce_ex p50 {}".format(
            u["verify_p50_us"], ", ".join(f"{u[k]:,.0f} µs at {k.rsplit('_', 1)[1]} lines"
                                          for k in u if k.startswith("casbin"))))
    parts += ["", table([[ln["metric"], ln["value"], ln["budget"], ln["status"]] for ln in results["budgets"]],
                        ["budget line", "measured", "budget", "status"])]
    for note in results.get("notes", []):
        parts += ["", "note: " + note]
    if results.get("profile_top"):
        parts += ["", "gateway profile under c=10 (py-spy, own time, top frames):", *results["profile_top"]]
    if results.get("profile_layers"):
        parts += ["", f"the same profile by layer (bench/profile_layers.py, {results['profile_samples']} samples):",
                  *results["profile_layers"]]
    return "\n".join(parts)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    http = results["http"]
    colors = {"direct": "#7f7f7f", "baseline": "#1f77b4", "gateway": "#d62728", "nginx-proxy": "#2ca02c",
              "tokenizer": "#9467bd"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    targets = measured_targets(http)
    width = 0.8 / len(targets)
    xs = range(len(CONCURRENCIES))

    def offset(i: int) -> float:
        return (i - (len(targets) - 1) / 2) * width

    ax = axes[0][0]
    for i, target in enumerate(targets):
        ax.bar([x + offset(i) for x in xs], [http[target][c]["rps"] for c in CONCURRENCIES], width,
               label=target, color=colors[target])
    ax.set_xticks(list(xs), [f"c={c}" for c in CONCURRENCIES])
    ax.set_yscale("log")
    ax.set_ylabel("req/s (log)")
    ax.set_title("Throughput")
    ax.legend()
    ax = axes[0][1]
    for i, target in enumerate(targets):
        ax.bar([x + offset(i) for x in xs], [http[target][c]["p50_us"] / 1000 for c in CONCURRENCIES], width,
               label=f"{target} p50", color=colors[target])
        ax.scatter([x + offset(i) for x in xs], [http[target][c]["p99_us"] / 1000 for c in CONCURRENCIES],
                   marker="_", s=300, color="black", zorder=3, label="p99" if i == 0 else None)
    ax.set_xticks(list(xs), [f"c={c}" for c in CONCURRENCIES])
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Latency: bars p50, ticks p99")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    decision = results.get("decision")
    if decision:
        tokens = sorted({r["tokens"] for r in decision["hot"]})
        sizes = sorted({r["policy_lines"] for r in decision["hot"]})
        w = 0.8 / (len(sizes) + 1)
        for j, lines in enumerate(sizes):
            cells = {r["tokens"]: r["p50_us"] for r in decision["hot"] if r["policy_lines"] == lines}
            ax.bar([i + j * w for i in range(len(tokens))], [cells[t] for t in tokens], w,
                   label=f"hot, {lines:,} policy lines")
        ws = {r["tokens"]: r["p50_us"] for r in decision["working_set"]}
        ax.bar([i + len(sizes) * w for i in range(len(tokens))], [ws.get(t, 0) for t in tokens], w,
               label="all tokens in turn", color="#bbbbbb")
        ax.axhline(DECISION_P50_US, color="red", linestyle="--", label=f"budget {DECISION_P50_US:.0f} µs")
        ax.set_xticks([i + w * len(sizes) / 2 for i in range(len(tokens))], [f"{t:,} tokens" for t in tokens])
        ax.set_yscale("log")
        ax.set_ylabel("µs p50 (log)")
        ax.set_title("Decision path, in process")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "decision path: skipped in this run", ha="center", va="center")
    ax = axes[1][1]
    ax.axis("off")
    text = "\n".join(f"{'OK ' if ln['status'] == 'met' else ('-- ' if ln['status'] == 'info' else '!! ')}"
                     f"{ln['metric']}\n      {ln['value']}  [{ln['budget']}]" for ln in results["budgets"])
    # Two text lines per budget line; 7.5 pt fits 17 of them, more (the peers' lines) get smaller type.
    ax.text(0, 1, text, va="top", family="monospace", fontsize=min(7.5, 7.5 * 17 / max(1, len(results["budgets"]))))
    ax.set_title("Budgets (DESIGN §14 / issue 7)")
    fig.suptitle(f"Scopegate bench {results['started']} ({results['machine']['cpus']} CPUs, "
                 f"{results['load_generator']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="bench/run", description="Scopegate performance benchmark (one run).")
    parser.add_argument("--quick", action="store_true",
                        help="a ~2 minute run: 3s per point, 1 round, 20,000-request soak, smaller samples")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per load point (BENCH_SECONDS; 8)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per point (BENCH_ROUNDS; 2)")
    parser.add_argument("--soak", type=int, default=None, help="soak requests (BENCH_SOAK; 100000)")
    parser.add_argument("--decision-iterations", type=int, default=None,
                        help="timed iterations per decision-path cell (BENCH_DECISION_ITERATIONS; 20000)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="largest token store for the decision path (BENCH_MAX_TOKENS; 100000)")
    parser.add_argument("--soak-concurrency", type=int, default=int(env("BENCH_SOAK_CONCURRENCY", "50")))
    parser.add_argument("--workers-concurrency", type=int, default=int(env("BENCH_WORKERS_CONCURRENCY", "50")))
    parser.add_argument("--skip", action="append", default=[],
                        choices=("decision", "soak", "workers", "graphql", "peers"),
                        help="leave a part out (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="also record the gateway under load with py-spy (collapsed stacks in bench/results/)")
    parser.add_argument("--python-loadgen", action="store_true",
                        help="use the Python load generator even if wrk is here")
    parser.add_argument("--no-nginx", action="store_true", help="use bench/upstream_server.py even if nginx is here")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="output folder (bench/results)")
    args = parser.parse_args()
    quick = {"seconds": 3.0, "rounds": 1, "soak": 20_000, "decision_iterations": 5_000, "max_tokens": 100_000}
    full = {"seconds": 8.0, "rounds": 2, "soak": 100_000, "decision_iterations": 20_000, "max_tokens": 100_000}
    defaults = quick if args.quick else full
    for key, kind in (("seconds", float), ("rounds", int), ("soak", int), ("decision_iterations", int),
                      ("max_tokens", int)):
        if getattr(args, key) is None:
            raw = env(f"BENCH_{key.upper()}")
            setattr(args, key, kind(raw) if raw else defaults[key])
    return args


def main() -> int:
    args = parse_args()

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    folder = Path(tempfile.mkdtemp(prefix="sg-bench-"))
    procs = Processes(folder)
    use_wrk = wrk_available() and not args.python_loadgen
    started = dt.datetime.now().astimezone()
    results: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_at_start": os.getloadavg()},
        "load_generator": "wrk -t1 (closed loop)" if use_wrk else "python aiohttp (closed loop)",
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "soak": args.soak,
                     "decision_iterations": args.decision_iterations, "max_tokens": args.max_tokens},
        "budgets_source": "DESIGN.md section 14 and issue 7",
    }
    with contextlib.suppress(Exception):
        results["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, check=False).stdout.strip()
    try:
        if not use_wrk:
            log("wrk not found: using the Python load generator (it shares the 2 cores with the servers, so "
                "absolute req/s are lower; the ratios still compare like with like)")
        if "decision" not in args.skip:
            from decision import run as run_decision

            results["decision"] = asyncio.run(run_decision(args.decision_iterations,
                                                           max(1000, args.decision_iterations // 4),
                                                           args.max_tokens, log=log))
        credential = os.environ.get(CREDENTIAL_ENV, "bench-upstream-credential")
        plan = plan_peers(folder, not args.no_nginx, credential) if "peers" not in args.skip else None
        upstream, upstream_url, results["upstream"] = start_upstream(procs, folder, not args.no_nginx,
                                                                     plan.extra if plan else "")
        log(f"upstream: {results['upstream']} at {upstream_url}")
        base_port = free_port()
        baseline = procs.start("baseline", [PYTHON, str(HERE / "baseline.py"), "--upstream", upstream_url,
                                            "--port", str(base_port)])
        baseline_url = f"http://127.0.0.1:{base_port}"
        wait_ready(baseline, baseline_url + PATH)
        config_path = write_gateway_config(folder, upstream_url)
        token, soak_tokens = mint_tokens(config_path, soak_tokens=100)
        gateway, gateway_url = start_gateway(procs, "gateway", config_path, workers=1)
        log(f"baseline at {baseline_url}, gateway at {gateway_url} (pid {gateway.pid})")
        # The gateway must be authorizing: the token is allowed, no token is 401, another app is 403.
        for url, expect in ((gateway_url + PATH, 200), (gateway_url + "/v1/apps/web-prod/machines", 403)):
            code, body = http_get(url, token)
            if code != expect:
                raise RuntimeError(f"gateway answered {code} to {url} (expected {expect}): {body[:300]!r}")
        code, _ = http_get(gateway_url + PATH)
        if code != 401:
            raise RuntimeError(f"gateway answered {code} without a token (expected 401)")
        urls = {"direct": upstream_url, "baseline": baseline_url, "gateway": gateway_url}
        servers = {"direct": upstream, "baseline": baseline, "gateway": gateway}
        peers = PeerTargets()
        if plan is not None:
            peers = start_peers(procs, folder, plan, token)
            results["peers"] = peers.info
            for peer in PEERS:
                info = peers.info.get(peer, {})
                log(f"{peer}: " + (f"{info['version']}, {info['what']}, at {peers.urls[peer]}"
                                   if info.get("measured") else info.get("reason", "?")))
            urls.update(peers.urls)
            servers.update(peers.servers)
        log("warm-up")
        for name, url in urls.items():
            options = {"token": token, **peers.load_options.get(name, {})}
            check(run_load(url + PATH, concurrency=10, seconds=2, use_wrk=use_wrk, **options), f"warm-up {name}")
        log(f"throughput and latency: {args.rounds} round(s) x {len(CONCURRENCIES)} concurrencies x {len(urls)} "
            f"targets x {args.seconds:g}s")
        results["http"] = http_matrix(urls, servers, token, args.seconds, args.rounds, use_wrk, peers.load_options)
        if "graphql" not in args.skip:
            log("GraphQL: POST /graphql (flyctl's ResolveImageForApp), gateway against the bare pass-through")
            gql = {"baseline": baseline_url, "gateway": gateway_url}
            for name, url in gql.items():
                check(run_load(url + "/graphql", concurrency=10, seconds=2, token=token, use_wrk=use_wrk,
                               body=GRAPHQL_BODY), f"warm-up graphql {name}")
            results["graphql"] = graphql_matrix(gql, {"baseline": baseline, "gateway": gateway}, token, args.seconds,
                                                args.rounds, use_wrk)
        if "soak" not in args.skip:
            log(f"soak: {args.soak:,} requests over {len(soak_tokens)} tokens and 1,000 paths")
            results["soak"] = soak(gateway, gateway_url, soak_tokens, args.soak, use_wrk,
                                   results["http"]["gateway"][50]["rps"], args.soak_concurrency)
            log(f"  RSS {results['soak']['rss_before_mib']:.1f} -> {results['soak']['rss_after_mib']:.1f} MiB")
        if args.profile:
            args.results.mkdir(parents=True, exist_ok=True)
            out = args.results / f"gateway-profile-{started.strftime('%Y%m%d-%H%M%S')}.txt"
            log(f"profile: py-spy on the gateway for {args.seconds:g}s at c=10 -> {out}")
            results["profile_top"] = profile(gateway, gateway_url, token, args.seconds, use_wrk, out)
            if out.exists():
                total, by_layer = profile_layers.shares(out)
                results["profile_layers"] = [f"{share * 100:5.1f}%  {layer}" for layer, share in by_layer]
                results["profile_samples"] = total
            results["profile_file"] = str(out)
        procs.stop(baseline)
        if "workers" not in args.skip:
            log("workers: --workers 2 against --workers 1")
            procs.stop(gateway)
            w1, w1_url = start_gateway(procs, "gateway-w1", config_path, workers=1)
            w2, w2_url = start_gateway(procs, "gateway-w2", config_path, workers=2)
            wurls = {"workers1": w1_url, "workers2": w2_url}
            for name, url in wurls.items():
                check(run_load(url + PATH, concurrency=args.workers_concurrency, seconds=2, token=token,
                               use_wrk=use_wrk), f"warm-up {name}")
            results["workers"] = workers_compare(wurls, {"workers1": w1, "workers2": w2}, token, args.seconds,
                                                 max(args.rounds, 2), use_wrk, args.workers_concurrency)
        results["budgets"] = budget_lines(results) + peer_ratio_lines(results["http"], CONCURRENCIES)
        results["notes"] = diagnose(results)
        results["finished"] = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
        text = report(results)
        results["table"] = text
        args.results.mkdir(parents=True, exist_ok=True)
        stamp = started.strftime("%Y%m%d-%H%M%S")
        json_path = args.results / f"bench-{stamp}.json"
        json_path.write_text(json.dumps(results, indent=2, default=str))
        shutil.copyfile(json_path, args.results / "latest.json")
        png_path = args.results / f"bench-{stamp}.png"
        try:
            chart(results, png_path)
            shutil.copyfile(png_path, args.results / "latest.png")
        except ImportError:
            log("matplotlib is not installed: no chart (`.venv/bin/pip install matplotlib`)")
        print(text, flush=True)
        log(f"wrote {json_path} and {png_path} (also latest.json / latest.png); "
            f"took {(dt.datetime.now().astimezone() - started).total_seconds():.0f}s")
        return 0
    except KeyboardInterrupt:
        log("interrupted: stopping everything this run started")
        return 130
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
