"""`scopegate serve --dev` (like `vault server -dev`).

An ephemeral keyring and SQLite store in a temporary folder, a sandbox upstream in a thread of
this process that emulates a small part of the Machines API, a token-admin token and a sample
deployer token printed with curl lines to try. Everything is gone when the process stops. Never
for production: it binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from gateway.app import GatewayApp
from gateway.cli.local import LocalAdmin
from gateway.config import SHIPPED_POLICIES, Config, build_config
from gateway.core.keyring import Keyring
from gateway.dev.local_registry import LocalRegistry
from gateway.dev.sandbox import create_sandbox_app
from gateway.dev.sandbox_macaroon import issue, new_root_key
from gateway.dev.sandbox_state import SANDBOX_ORG_SLUG
from gateway.errors import ConfigError
from gateway.server import bind, serve
from gateway.services import Services


class SandboxThread:
    """The sandbox upstream, served by uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, macaroon_key: bytes) -> None:
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_sandbox_app(macaroon_key=macaroon_key), log_level="warning",
                                access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: self.server.run(sockets=[self.sock]),
                                       name="sandbox-upstream", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise ConfigError("the dev sandbox upstream did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


def run_dev(args: argparse.Namespace) -> int:
    host = args.host or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("--dev binds loopback only (127.0.0.1); it is not for serving others")
    if args.workers != 1:
        raise ConfigError("--dev runs one worker")
    folder = Path(tempfile.mkdtemp(prefix="scopegate-dev-"))
    # The sandbox plays Fly: it holds the root key, issues the gateway's org macaroon, and checks
    # every request's (narrowed) macaroon the way Fly does.
    macaroon_key = new_root_key()
    credential = issue(macaroon_key)
    sandbox = SandboxThread(macaroon_key)
    registry = LocalRegistry(folder / "registry", user="x", password=credential)
    cleaned = threading.Event()

    def clean_up() -> None:
        if cleaned.is_set():
            return
        cleaned.set()
        registry.stop()
        sandbox.stop()
        shutil.rmtree(folder, ignore_errors=True)

    def stop(signum: int, frame: object) -> None:
        # SIGTERM or Ctrl-C before uvicorn installs its own handlers, or re-raised by uvicorn after
        # its graceful shutdown: remove the ephemeral keyring and store, then exit. Not by raising
        # from the handler: an exception raised there can land in a weakref callback, where Python
        # ignores it, and the server would go on running.
        clean_up()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if signum == signal.SIGTERM else 130)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        sandbox.start()
        registry_url = _start_registry(registry, sandbox.port)
        config = build_config(
            {"upstream": {"url": f"http://127.0.0.1:{sandbox.port}",
                          "graphql_url": f"http://127.0.0.1:{sandbox.port}/graphql",
                          "api_url": f"http://127.0.0.1:{sandbox.port}", "org_slug": SANDBOX_ORG_SLUG,
                          "registry_url": registry_url, "auth_scheme": "FlyV1", "attenuate": "apps"},
             "tokens": {"keyring": str(folder / "keyring.json")},
             "store": {"url": f"sqlite:///{folder / 'state.db'}"},
             "audit": {"sinks": ["stdout"]}, **_shipped_policies()},
            base_dir=Path.cwd(), source="(dev)", environ={})
        keyring = Keyring.generate(config.tokens_keyring)
        keyring.save()
        admin_token, deploy_token = asyncio.run(_dev_tokens(config, keyring))
        services = Services.build(config, credential=credential)
        sock = bind(host, 8080 if args.port is None else args.port)
        base = f"http://{host}:{sock.getsockname()[1]}"
        _print_dev_banner(base, admin_token, deploy_token)
        _print_registry_banner(base, registry)
        serve(GatewayApp(services), sock)
    finally:
        clean_up()
    return 0


def _shipped_policies() -> dict[str, object]:
    """The policies, route maps and constraints installed with the package, whatever folder dev
    mode starts in."""
    routes = SHIPPED_POLICIES / "routes"
    return {"policy": {"model": str(SHIPPED_POLICIES / "model.conf"), "policy": str(SHIPPED_POLICIES / "policy.csv"),
                       "constraints": str(SHIPPED_POLICIES / "constraints.yaml")},
            "routes": [str(routes / "fly-machines.yaml")], "graphql": {"map": str(routes / "fly-graphql.yaml")},
            "rest": {"routes": [str(routes / "fly-api.yaml")]}}


def _start_registry(registry: LocalRegistry, sandbox_port: int) -> str:
    """A real registry behind `/v2/...` when Debian's docker-registry is installed; without it,
    the sandbox (which serves no `/v2/`) stands in and registry requests get the upstream's 404."""
    try:
        return registry.start().url
    except RuntimeError as exc:
        print(f"dev mode: no local image registry ({exc})", flush=True)
        return f"http://127.0.0.1:{sandbox_port}"


def _print_registry_banner(base: str, registry: LocalRegistry) -> None:
    if registry.process is None:
        return
    host = base.removeprefix("http://")
    print(f"""Image registry through the gateway (a local registry at {registry.url}, pushes gated per app):
  skopeo copy --dest-tls-verify=false --dest-creds x:$DEPLOY_TOKEN oci:./layout:v1 docker://{host}/web-staging:v1
  crane auth login {host} -u x -p $DEPLOY_TOKEN && crane --insecure ls {host}/web-staging
""", flush=True)


async def _dev_tokens(config: Config, keyring: Keyring) -> tuple[str, str]:
    admin = LocalAdmin.open(config, keyring)
    try:
        token_admin = await admin.registry.mint(grants=["token-admin@gateway"], ttl_s=86400, name="dev-admin",
                                                subject="dev:admin")
        deployer = await admin.registry.mint(grants=["deployer@app:web-staging"], ttl_s=86400,
                                             name="dev-deploy-web-staging", subject="dev:ci")
    finally:
        await admin.close()
    return token_admin.token, deployer.token


def _print_dev_banner(base: str, admin_token: str, deploy_token: str) -> None:
    print(f"""
Scopegate dev mode: ephemeral keys and store, sandbox upstream (never use in production).

Listening on {base}

Token-admin token (grant token-admin@gateway); with these two the scopegate CLI works on this gateway:
  export SCOPEGATE_ADDR={base} SCOPEGATE_TOKEN={admin_token}
Sample deploy token (grant deployer@app:web-staging):
  export DEPLOY_TOKEN={deploy_token}

Allowed (deployer may read web-staging's machines):
  curl -s -H "Authorization: Bearer $DEPLOY_TOKEN" {base}/v1/apps/web-staging/machines
Denied with 403 (the token does not cover web-prod):
  curl -s -H "Authorization: Bearer $DEPLOY_TOKEN" {base}/v1/apps/web-prod/machines

flyctl through the gateway (Machines API, GraphQL and REST API all point here):
  export FLY_API_TOKEN=$DEPLOY_TOKEN FLY_FLAPS_BASE_URL={base} FLY_API_BASE_URL={base} FLY_UIEX_BASE_URL={base}
  export FLY_TRACE_COLLECTOR_URL=127.0.0.1 FLY_SEND_METRICS=0 FLY_NO_UPDATE_CHECK=1
  fly deploy --image registry.fly.io/web-staging:v2 -a web-staging --dns-checks=false
""", flush=True)
