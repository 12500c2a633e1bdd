"""`scopegate serve --workers N` (gateway/server_workers.py): every worker on its own SO_REUSEPORT
socket of one port, so connections opened at once spread over the workers; each worker serves
(and forwards) on its own; a stop ends them all."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, write_config
from tests.servers import RecordingUpstream, ServerThread
from tests.test_cli import CLI, LISTENING, Process, Setup, clean_env, processes, recording_upstream

__all__ = ["processes", "recording_upstream"]  # the fixtures this module uses


def workers_of(pid: int) -> list[int]:
    """The worker processes (multiprocessing's spawned children, not its resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in Path(
                    f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


def sockets_held(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count


def test_two_workers_share_one_port_and_connections_spread_over_both(
        tmp_path: Path, processes: list[Process], recording_upstream: tuple[RecordingUpstream, ServerThread]) -> None:
    upstream, upstream_server = recording_upstream
    config = write_config(tmp_path, upstream_server.url)
    setup = Setup(tmp_path, config, "")
    assert setup.cli("init").returncode == 0
    token = setup.mint("deployer@app:web-staging", extra=("--name", "workers"))
    server = Process([*CLI, "serve", "--config", str(config), "--port", "0", "--workers", "2"],
                     env=clean_env(**{CREDENTIAL_ENV: UPSTREAM_SECRET}), cwd=tmp_path)
    processes.append(server)
    lines = server.wait_for("stderr", lambda ls: any(LISTENING.search(line) for line in ls))
    base = next(m for m in map(LISTENING.search, lines) if m).group(1)
    assert any("(2 workers)" in line for line in lines)
    port = int(base.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while True:  # both workers up and ready (each answers readyz on its own socket)
        workers = workers_of(server.proc.pid)
        try:
            ready = len(workers) == 2 and httpx.get(base + "/_gateway/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready:
            break
        assert time.monotonic() < deadline, server.text("stderr")
        time.sleep(0.1)
    time.sleep(1.0)  # the second worker's startup, if the first answered
    before = {pid: sockets_held(pid) for pid in workers}
    held = []
    try:
        for _ in range(40):  # opened at once and kept open, as a load generator or a proxy in front does
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(conn)
        for conn in held:
            conn.sendall(b"GET /_gateway/readyz HTTP/1.1\r\nhost: gw\r\n\r\n")
        for conn in held:
            assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
        grown = {pid: sockets_held(pid) - before[pid] for pid in workers}
        assert sum(grown.values()) >= 40
        assert all(count >= 5 for count in grown.values()), f"connections per worker: {grown}"
    finally:
        for conn in held:
            conn.close()
    with httpx.Client(base_url=base, timeout=5) as client:  # and they forward, with the credential injected
        for _ in range(10):
            response = client.get("/v1/apps/web-staging/machines", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, response.text
    assert len(upstream.received) == 10
    assert all(got.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"] for got in upstream.received)
    code = server.stop()
    assert code in (0, -signal.SIGTERM), server.text("stderr")
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
               for pid in workers)
