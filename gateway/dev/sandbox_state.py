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

__all__ = ["SANDBOX_ORG_SLUG", "App", "Org", "SandboxError", "SandboxState", "grant_lease", "image_ref",
           "lease_json", "public_secret", "timestamp"]

# The one organization the sandbox has. Fly names every user's own org "personal", and the seeded
# apps, the SDK contract tests and dev mode's `upstream.org_slug` all use that slug.
SANDBOX_ORG_SLUG = "personal"

_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEFAULT_LEASE_TTL = 30


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _numeric_id() -> int:
    return secrets.randbelow(10**9) + 10**8  # Fly's internal numeric ids are plain positive integers


def org_numeric_id(slug: str) -> int:
    """Derived from the slug, so an app's JSON can name its org's id without holding the `Org`."""
    return int.from_bytes(hashlib.sha256(slug.encode()).digest()[:4], "big") + 10**8


@dataclass
class Org:
    """An organization: flyctl reads it over uiex REST (`GET /api/v1/organizations/{slug}`) and GraphQL."""

    slug: str
    name: str
    id: str = field(default_factory=lambda: "org_" + secrets.token_hex(6))

    @property
    def internal_numeric_id(self) -> int:
        return org_numeric_id(self.slug)

    def to_uiex(self) -> dict[str, Any]:
        """uiex's `Organization` (flyctl internal/uiex/organizations.go)."""
        return {"id": self.id, "internal_numeric_id": self.internal_numeric_id, "slug": self.slug,
                "raw_slug": self.slug, "paid_plan": True, "personal": self.slug == "personal",
                "billing_status": "CURRENT", "provisions_beta_extensions": False, "name": self.name,
                "billable": True, "remote_builder_image": "docker-hub-mirror.fly.io/flyio/rchab:sandbox"}


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
    internal_numeric_id: int = field(default_factory=_numeric_id)
    releases: list[dict[str, Any]] = field(default_factory=list)  # uiex Release, newest last
    logs: list[dict[str, Any]] = field(default_factory=list)  # fly-go LogEntry, oldest first

    def to_json(self) -> dict[str, Any]:
        organization = {"name": self.org_slug, "slug": self.org_slug,
                        "internal_numeric_id": org_numeric_id(self.org_slug)}
        return {
            "id": self.id, "name": self.name, "machine_count": len(self.machines), "volume_count": 0,
            "network": self.network, "status": "deployed" if self.machines else "pending",
            "internal_numeric_id": self.internal_numeric_id, "organization": organization,
        }

    def log(self, message: str, instance: str = "", region: str = "iad", provider: str = "app") -> None:
        self.logs.append({"id": secrets.token_hex(8), "timestamp": timestamp(), "message": message,
                          "level": "info", "instance": instance, "region": region,
                          "meta": {"instance": instance, "region": region, "event": {"provider": provider}}})

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
    orgs: dict[str, Org] = field(default_factory=lambda: {SANDBOX_ORG_SLUG: Org(SANDBOX_ORG_SLUG, "Sandbox")})
    builds: dict[int, dict[str, Any]] = field(default_factory=dict)  # uiex builds, by id
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # GraphQL Image, by ref

    def new_release(self, app: App, image: str, strategy: str, definition: Any, user: str) -> dict[str, Any]:
        """A release as uiex `POST /api/v1/releases` makes it: pending until flyctl PATCHes its status."""
        release = {"id": "rel_" + secrets.token_hex(8), "version": len(app.releases) + 1, "stable": False,
                   "in_progress": True, "status": "pending", "strategy": strategy or "ROLLING", "user": user,
                   "created_at": timestamp(), "image_ref": image, "definition": definition,
                   "description": f"Deploy image {image}", "reason": "deploy", "metadata": None}
        app.releases.append(release)
        app.log(f"Release v{release['version']} created for image {image}", provider="app")
        return release

    def release(self, release_id: str) -> tuple[App, dict[str, Any]]:
        for app in self.apps.values():
            for release in app.releases:
                if release["id"] == release_id:
                    return app, release
        raise SandboxError(404, f"release {release_id} not found")

    def image(self, ref: str) -> dict[str, Any]:
        """The GraphQL `Image` that Fly resolves for a reference; made up, but stable per reference."""
        if ref not in self.images:
            parts = image_ref(ref)
            digest = "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
            self.images[ref] = {"id": "img_" + digest[7:19], "digest": digest, "ref": ref,
                                "registry": parts["registry"], "repository": parts["repository"],
                                "tag": parts["tag"], "absoluteRef": f"{ref.partition('@')[0]}@{digest}",
                                "compressedSize": 31_457_280, "compressedSizeFull": "31457280",
                                "label": parts["tag"], "createdAt": timestamp(), "config": {},
                                "configDigest": {}, "manifest": {"schemaVersion": 2}}
        return self.images[ref]

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
            image = f"registry.fly.io/{name}:deployment-1"
            # The metadata flyctl stamps on the machines it deploys; without it `fly deploy` and
            # `fly status` treat the machine as foreign ("not part of Fly Launch") and leave it alone.
            metadata = {"fly_platform_version": "v2", "fly_process_group": "app", "fly_release_version": "1"}
            config: dict[str, Any] = {"image": image, "guest": {"cpus": 1, "memory_mb": 256}, "metadata": metadata}
            self.new_machine(app, config, "iad", f"{name}-1")
            app.put_secret("DATABASE_URL", f"postgres://sandbox@db.internal/{name}")
            app.secrets_version = 1
            release = self.new_release(app, image, "ROLLING", None, "sandbox@scopegate.dev")
            release.update(status="complete", in_progress=False, stable=True)
            for machine in app.machines.values():
                app.log("Listening on 0.0.0.0:8080", machine["id"], machine["region"])


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
