"""Shared fixtures: a recording upstream and a real gateway (uvicorn) in front of it."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import settings

from gateway.app import GatewayApp
from gateway.cli.local import LocalAdmin
from gateway.config import Config, load_config
from gateway.core.keyring import Keyring
from gateway.services import Services
from gateway.store import TokenRecord
from tests.servers import RecordingUpstream, ServerThread

# CI runs the same examples every time (a property test that found a bug fails every run, not one
# run in N); developers' runs stay random and keep finding new ones. Found bugs get an @example.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parent.parent
UPSTREAM_SECRET = "fm2_upstream-credential-never-leaks-0123456789"
CREDENTIAL_ENV = "SG_TEST_UPSTREAM_TOKEN"


@dataclass
class RunningGateway:
    config: Config
    services: Services
    server: ServerThread
    upstream: RecordingUpstream
    audit_file: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def mint(self, *grants: str, ttl_s: int | None = None, name: str = "test-token", subject: str = "test:user") -> str:
        async def run() -> str:
            admin = LocalAdmin.open(self.config)
            try:
                minted = await admin.registry.mint(grants=list(grants), ttl_s=ttl_s, name=name, subject=subject)
            finally:
                await admin.close()
            return minted.token

        return asyncio.run(run())

    def revoke(self, jti: str) -> list[str]:
        async def run() -> list[str]:
            admin = LocalAdmin.open(self.config)
            try:
                return await admin.registry.revoke(jti, reason="test")
            finally:
                await admin.close()

        return asyncio.run(run())

    def records(self) -> list[TokenRecord]:
        """Every token record in the gateway's store, read as the CLI reads it."""
        async def run() -> list[TokenRecord]:
            admin = LocalAdmin.open(self.config)
            try:
                return await admin.store.records()
            finally:
                await admin.close()

        return asyncio.run(run())

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def audit_text(self) -> str:
        """The audit file as written so far, with what the loop has queued but not yet written."""
        self.services.audit.flush()
        return self.audit_file.read_text() if self.audit_file.exists() else ""

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_text().splitlines() if line]


def write_config(folder: Path, upstream_url: str, **sections: dict[str, Any]) -> Path:
    document: dict[str, Any] = {
        # The organization the credential serves: a body naming another one is refused (bodies.py).
        "upstream": {"url": upstream_url, "token_env": CREDENTIAL_ENV, "read_timeout_s": 3, "org_slug": "acme"},
        "policy": {"model": str(REPO / "policies/model.conf"), "policy": str(REPO / "policies/policy.csv")},
        "routes": [str(REPO / "policies/routes/fly-machines.yaml")],
        "tokens": {"keyring": "keyring.json"},
        "store": {"url": "sqlite:///state.db"},
        "audit": {"sinks": ["file:audit.jsonl"]},
    }
    for section, values in sections.items():
        document.setdefault(section, {}).update(values)
    path = folder / "scopegate.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def start_gateway(folder: Path, recorder: RecordingUpstream, recorder_server: ServerThread,
                  **sections: dict[str, Any]) -> RunningGateway:
    """A gateway in front of `recorder`; `sections` override config keys, e.g. limits={...}."""
    config = load_config(write_config(folder, recorder_server.url, **sections))
    if not config.tokens_keyring.exists():
        Keyring.generate(config.tokens_keyring).save()
    services = Services.build(config)
    server = ServerThread(GatewayApp(services), gateway_stack=True).start()
    return RunningGateway(config, services, server, recorder, folder / "audit.jsonl")


@pytest.fixture
def upstream() -> Iterator[tuple[RecordingUpstream, ServerThread]]:
    app = RecordingUpstream()
    server = ServerThread(app).start()
    yield app, server
    server.stop()


@pytest.fixture
def gateway(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
            monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = start_gateway(tmp_path, *upstream)
    yield running
    running.server.stop()
