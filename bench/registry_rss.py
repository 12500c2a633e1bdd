"""Gateway memory while a 1 GiB layer goes through the registry surface, both ways.

    .venv/bin/python bench/registry_rss.py            # 1 GiB (about a minute on 2 cores)
    .venv/bin/python bench/registry_rss.py --mib 256  # shorter

Starts a real registry (Debian's docker-registry, gateway/dev/local_registry.py) and the gateway
as its own process (`scopegate serve`, so its RSS is only its own), pushes one layer as a
chunked, streamed PATCH (what crane and docker send), closes it with PUT ?digest=, then pulls
it back with a streamed GET, sampling the gateway's VmRSS from /proc every 50 ms. The layer is
generated on the fly (1 MiB of random bytes repeated), so the client holds 1 MiB, not 1 GiB. A
flat RSS (peak minus baseline a few MiB, not hundreds) shows the gateway streams and never
buffers a layer. Numbers are printed; nothing is asserted (this is a measurement, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.cli.local import LocalAdmin  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.core.keyring import Keyring  # noqa: E402
from gateway.dev.local_registry import LocalRegistry, free_port  # noqa: E402

CHUNK = 1024 * 1024
CREDENTIAL = "fm2_bench-registry-credential"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Sampler:
    """The peak RSS of `pid` while a phase runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self.peak = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def layer(mib: int, digest: hashlib._Hash) -> Iterator[bytes]:
    block = os.urandom(CHUNK)
    for _ in range(mib):
        digest.update(block)
        yield block


def start_gateway(folder: Path, registry: LocalRegistry) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    config_file = folder / "scopegate.yaml"
    config_file.write_text(yaml.safe_dump({
        "upstream": {"url": "http://127.0.0.1:9", "registry_url": registry.url, "token_env": "SG_BENCH_CREDENTIAL"},
        "tokens": {"keyring": "keyring.json"}, "store": {"url": "sqlite:///state.db"},
        "audit": {"sinks": ["file:audit.jsonl"]}}))
    config = load_config(config_file)
    Keyring.generate(config.tokens_keyring).save()

    async def mint() -> str:
        admin = LocalAdmin.open(config)
        try:
            return (await admin.registry.mint(grants=["deployer@app:web-staging"], ttl_s=3600, name="bench",
                                              subject="bench")).token
        finally:
            await admin.close()

    token = asyncio.run(mint())
    env = {**os.environ, "SG_BENCH_CREDENTIAL": CREDENTIAL}
    process = subprocess.Popen([str(REPO / ".venv/bin/scopegate"), "serve", "--config", str(config_file),
                                "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 401:
                return process, port, token
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the gateway did not start")


def push(client: httpx.Client, repo: str, mib: int) -> tuple[float, str]:
    """Push one layer (chunked PATCH, then PUT ?digest=) to `repo`; (seconds, digest)."""
    digest = hashlib.sha256()
    started = time.perf_counter()
    location = client.post(f"/v2/{repo}/blobs/uploads/").headers["location"]
    patched = client.patch(location, content=layer(mib, digest))
    assert patched.status_code == 202, patched.text
    name = f"sha256:{digest.hexdigest()}"
    separator = "&" if "?" in patched.headers["location"] else "?"
    closed = client.put(f"{patched.headers['location']}{separator}digest={name}")
    assert closed.status_code == 201, closed.text
    return time.perf_counter() - started, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="layer size in MiB (default 1024)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sg-registry-rss-"))
    registry = LocalRegistry(folder / "registry", user="x", password=CREDENTIAL).start()
    process, port, token = start_gateway(folder, registry)
    try:
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            client.get("/v2/web-staging/tags/list")  # warm: imports, connections
            baseline = rss_kib(process.pid)
            # The same push straight to the registry, before and after the gateway's (the machine's
            # load drifts): the budget compares throughput through the gateway with the direct one.
            with httpx.Client(base_url=registry.url, auth=("x", CREDENTIAL), timeout=120) as direct:
                direct_s = [push(direct, "web-direct", args.mib)[0]]
                with Sampler(process.pid) as sampler:
                    push_s, name = push(client, "web-staging", args.mib)
                direct_s.append(push(direct, "web-direct", args.mib)[0])
            after_push = rss_kib(process.pid)
            check = hashlib.sha256()
            started = time.perf_counter()
            with Sampler(process.pid) as pull, client.stream("GET", f"/v2/web-staging/blobs/{name}") as answer:
                for piece in answer.iter_bytes(CHUNK):
                    check.update(piece)
            pull_s = time.perf_counter() - started
            assert f"sha256:{check.hexdigest()}" == name, "the pulled layer differs"
        mib = args.mib
        direct_mean = sum(direct_s) / len(direct_s)
        print(f"layer: {mib} MiB, pushed in {push_s:.1f} s ({mib / push_s:.0f} MiB/s), "
              f"pulled in {pull_s:.1f} s ({mib / pull_s:.0f} MiB/s), digests equal")
        print(f"direct push to the same registry: {', '.join(f'{s:.1f} s' for s in direct_s)} "
              f"({mib / direct_mean:.0f} MiB/s); through the gateway / direct throughput: "
              f"{direct_mean / push_s:.2f}x (budget >= 0.8x)")
        print(f"gateway RSS baseline: {baseline / 1024:.1f} MiB")
        print(f"gateway RSS peak while pushing: {sampler.peak / 1024:.1f} MiB "
              f"(+{(sampler.peak - baseline) / 1024:.1f} MiB; budget < 50 MB)")
        print(f"gateway RSS after the push: {after_push / 1024:.1f} MiB")
        print(f"gateway RSS peak while pulling: {pull.peak / 1024:.1f} MiB (+{(pull.peak - baseline) / 1024:.1f} MiB)")
    finally:
        process.terminate()
        process.wait(timeout=10)
        registry.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
