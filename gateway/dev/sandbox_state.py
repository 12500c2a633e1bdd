"""The sandbox's in-memory model: apps with their machines, leases and secrets, and their JSON shape.

Kept apart from the routes (gateway/sandbox.py), which only parse requests and pick records: the
records are stored already in the upstream OpenAPI spec's JSON shape, so the rules that make them
(ids, image references, lease expiry, secret digests and versions) sit in one place, and the
contract tests read `SandboxState` directly to see what a client call really changed.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["App", "SandboxError", "SandboxState", "grant_lease", "image_ref", "lease_json", "public_secret",
           "timestamp"]

_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEFAULT_LEASE_TTL = 30


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class App:
    """One app; machines, leases and secrets are stored already in the spec's JSON shape."""

    name: str
    org_slug: str
    network: str = "default"
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)  # Machine, by id
    leases: dict[str, dict[str, Any]] = field(default_factory=dict)  # Lease, by machine id
    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)  # AppSecret with its value
    secrets_version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "machine_count": len(self.machines), "volume_count": 0,
            "network": self.network, "status": "deployed" if self.machines else "pending",
            "organization": {"name": self.org_slug, "slug": self.org_slug},
        }

    def live_lease(self, machine_id: str) -> dict[str, Any] | None:
        lease = self.leases.get(machine_id)
        if lease is not None and lease["expires_at"] <= int(time.time()):
            del self.leases[machine_id]
            return None
        return lease

    def bump_secrets_version(self) -> dict[str, int]:
        self.secrets_version += 1  # "Version" is the spec's deprecated spelling, still read by old clients
        return {"version": self.secrets_version, "Version": self.secrets_version}

    def put_secret(self, name: str, value: str) -> dict[str, Any]:
        if not _SECRET_NAME.fullmatch(name):
            raise SandboxError(400, f"invalid secret name {name!r}")
        now, old = timestamp(), self.secrets.get(name, {})
        digest = hashlib.sha256(value.encode()).hexdigest()[:16]
        self.secrets[name] = {"name": name, "digest": digest, "created_at": old.get("created_at", now),
                              "updated_at": now, "value": value}
        return self.secrets[name]


@dataclass
class SandboxState:
    """Everything one sandbox knows; each app gets its own, so two sandboxes never share data."""

    apps: dict[str, App] = field(default_factory=dict)

    def new_machine(self, app: App, config: dict[str, Any], region: str, name: str | None) -> dict[str, Any]:
        taken = {mid for a in self.apps.values() for mid in a.machines}
        while (mid := secrets.token_hex(7)) in taken:  # 14 hex characters, like Fly's ids
            pass
        now = timestamp()
        app.machines[mid] = {
            "id": mid, "name": name or f"{app.name}-{mid[:6]}", "state": "started", "region": region,
            "instance_id": secrets.token_hex(13).upper(), "private_ip": f"fdaa:0:1:a7b:{mid[:4]}::2",
            "config": config, "image_ref": image_ref(config["image"]), "created_at": now,
            "updated_at": now, "events": [], "checks": [], "host_status": "ok",
        }
        return app.machines[mid]

    def seed(self) -> None:
        for name in ("web-staging", "web-prod", "api-staging"):
            app = self.apps[name] = App(name=name, org_slug="personal")
            config = {"image": f"registry.fly.io/{name}:deployment-1", "guest": {"cpus": 1, "memory_mb": 256}}
            self.new_machine(app, config, "iad", f"{name}-1")
            app.put_secret("DATABASE_URL", f"postgres://sandbox@db.internal/{name}")
            app.secrets_version = 1


class SandboxError(Exception):
    """Rendered as the spec's ErrorResponse, `{"error": message}`, with the given status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def image_ref(image: str) -> dict[str, Any]:
    name, _, digest = image.partition("@")
    first, _, rest = name.partition("/")
    registry, path = (first, rest) if rest and ("." in first or ":" in first) else ("docker.io", name)
    repository, _, tag = path.partition(":")
    return {"registry": registry, "repository": repository, "tag": tag or "latest", "digest": digest}


def grant_lease(app: App, machine: dict[str, Any], ttl: Any, description: str = "") -> dict[str, Any]:
    ttl = ttl if isinstance(ttl, int) and ttl > 0 else _DEFAULT_LEASE_TTL
    held = app.live_lease(machine["id"])  # its holder refreshes it and keeps the nonce
    nonce = held["nonce"] if held else secrets.token_hex(16)
    lease = {"nonce": nonce, "owner": "sandbox@scopegate.dev", "description": description,
             "expires_at": int(time.time()) + ttl, "version": machine["instance_id"]}
    app.leases[machine["id"]] = lease
    return lease


def lease_json(lease: dict[str, Any]) -> dict[str, Any]:
    # The spec says a bare Lease but fly-go reads {"status", "data"}; both keep either client working.
    return {**lease, "status": "success", "data": lease}


def public_secret(secret: dict[str, Any], show_value: bool) -> dict[str, Any]:
    return secret if show_value else {k: v for k, v in secret.items() if k != "value"}
