"""Real tools for the contract tests: Prism serving the Fly Machines spec, a gateway in front of any
upstream URL, and the fly-python-sdk in a virtualenv of its own.

Everything installed lives in the project-local, git-ignored `.tools/` folder, so a second run
starts in seconds: `scripts/install-test-tools` installs Prism (npm), `sdk_python()` builds the SDK's
virtualenv. Nothing is installed globally.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.app import GatewayApp
from gateway.cli.local import LocalAdmin
from gateway.config import Config, load_config
from gateway.core.keyring import Keyring
from gateway.services import Services
from tests.conftest import REPO, write_config
from tests.servers import ServerThread

TOOLS = REPO / ".tools"
PRISM_BIN = TOOLS / "node_modules" / ".bin" / "prism"
INSTALL_SCRIPT = REPO / "scripts" / "install-test-tools"
SDK_VENV = TOOLS / "fly-sdk-venv"
SDK_REQUIREMENT = "fly-python-sdk==0.3.4"
SPEC_NAME = "shared/upstream/fly-machines-openapi.json"

# Properties the spec declares as `type: object` *and* `allOf: [<string or integer enum>]`: no value
# satisfies both, so Prism's generated examples always violate the spec (a 500 under --errors) and a
# client sending the real string (fly-go does) would be refused. Fly's API reads them as the enum.
CONTRADICTORY = (
    ("fly.ContainerDependency", "condition"),
    ("fly.ContainerHealthcheck", "kind"),
    ("fly.ContainerHealthcheck", "unhealthy"),
    ("fly.HTTPHealthcheck", "scheme"),
    ("main.TokenAccess", "action"),
)


def spec_path() -> Path:
    """The shared Fly Machines spec: beside the repo clone (CI), else the workplace copy.

    Missing is an error, never a skip: the contract tests are worthless without the spec.
    """
    candidates = [Path(__file__).resolve().parents[3] / SPEC_NAME, Path("/work") / SPEC_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the Fly Machines OpenAPI spec is missing; looked in {[str(c) for c in candidates]}")


def load_spec() -> dict[str, Any]:
    document = json.loads(spec_path().read_text())
    assert isinstance(document, dict)
    return document


def prism_spec(original: dict[str, Any]) -> dict[str, Any]:
    """The copy Prism serves: `/v1` on every path (Prism ignores the path of the server URL), the
    contradictory schemas above resolved to their enum, and bearer auth required everywhere.

    The published spec declares no security scheme although the real API refuses requests without
    `Authorization`; requiring `Bearer` makes Prism answer 401 unless the gateway injected its
    credential, so a request forwarded without it fails the contract test.
    """
    spec = copy.deepcopy(original)
    spec["paths"] = {"/v1" + path: item for path, item in original["paths"].items()}
    schemas = spec["components"]["schemas"]
    for schema, prop in CONTRADICTORY:
        node = schemas[schema]["properties"][prop]
        assert node.get("type") == "object" and "allOf" in node, f"{schema}.{prop} changed upstream; revisit"
        del node["type"]
    spec["components"].setdefault("securitySchemes", {})["gatewayCredential"] = {"type": "http", "scheme": "bearer"}
    spec["security"] = [{"gatewayCredential": []}]
    return spec


def operations(spec: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(operationId, METHOD, path as in the spec, operation) for every operation."""
    found = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                found.append((operation["operationId"], method.upper(), path, operation))
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_prism() -> Path:
    """Prism from .tools/, installed by scripts/install-test-tools when missing (fast when present)."""
    result = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0 or not PRISM_BIN.exists():
        raise RuntimeError(f"scripts/install-test-tools failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return PRISM_BIN


@dataclass
class Prism:
    """A `prism mock --errors` process on a loopback port; its log is read to see what reached it."""

    process: subprocess.Popen[bytes]
    port: int
    spec_file: Path
    log_file: Path
    credential: str
    _log_handle: Any = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, spec_file: Path, folder: Path, credential: str) -> Prism:
        binary = ensure_prism()
        log_file = folder / "prism.log"
        last_error = ""
        for _ in range(3):  # a port taken between free_port() and Prism's bind: try another
            port = free_port()
            handle = log_file.open("wb")
            env = {**os.environ, "SCARF_ANALYTICS": "false", "NO_COLOR": "1", "FORCE_COLOR": "0"}
            process = subprocess.Popen(
                [str(binary), "mock", "--errors", "--host", "127.0.0.1", "--port", str(port), str(spec_file)],
                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder, env=env)
            prism = cls(process, port, spec_file, log_file, credential, handle)
            try:
                prism.wait_ready()
                return prism
            except RuntimeError as exc:
                last_error = str(exc)
                prism.stop()
        raise RuntimeError(f"Prism did not start: {last_error}")

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prism exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if "Prism is listening" in self.log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"Prism did not listen within {timeout_s} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def received(self, method: str, path: str) -> int:
        """How many requests Prism logged for METHOD PATH (the path as sent, without the query)."""
        return self.log().count(f"[HTTP SERVER] {method.lower()} {path} ")

    def sync(self, timeout_s: float = 10) -> None:
        """Returns once Prism has logged everything sent before: a fresh marker request shows up last."""
        marker = f"/v1/apps/sync-{uuid.uuid4().hex[:12]}"
        with httpx.Client(timeout=10) as client:
            client.get(self.url + marker, headers={"Authorization": f"Bearer {self.credential}"})
        deadline = time.monotonic() + timeout_s
        while self.received("GET", marker) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prism never logged {marker}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log_handle is not None:
            self._log_handle.close()


@dataclass
class Gateway:
    """A real gateway (the production uvicorn stack) in front of `upstream_url`."""

    config: Config
    services: Services
    server: ServerThread
    _tokens: dict[tuple[str, ...], str] = field(default_factory=dict)

    @classmethod
    def start(cls, folder: Path, upstream_url: str, **sections: dict[str, Any]) -> Gateway:
        folder.mkdir(parents=True, exist_ok=True)
        config = load_config(write_config(folder, upstream_url, **sections))
        if not config.tokens_keyring.exists():
            Keyring.generate(config.tokens_keyring).save()
        services = Services.build(config)
        server = ServerThread(GatewayApp(services), gateway_stack=True).start()
        return cls(config, services, server)

    @property
    def url(self) -> str:
        return self.server.url

    def token(self, *grants: str, name: str = "contract") -> str:
        """A token with these grants, minted once per grant set and name."""
        key = (name, *grants)
        if key not in self._tokens:
            async def mint() -> str:
                admin = LocalAdmin.open(self.config)
                try:
                    minted = await admin.registry.mint(grants=list(grants), ttl_s=3600, name=name,
                                                       subject="test:contract")
                finally:
                    await admin.close()
                return minted.token

            self._tokens[key] = asyncio.run(mint())
        return self._tokens[key]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15)

    def stop(self) -> None:
        self.server.stop()


def sdk_python() -> Path:
    """The python of a virtualenv holding fly-python-sdk (it pins httpx<0.25, so never ours).

    Built once into .tools/fly-sdk-venv (atomically: a half-built venv is never reused)."""
    python = SDK_VENV / "bin" / "python"
    probe = "import importlib.metadata as m, fly_python_sdk; print(m.version('fly-python-sdk'))"
    if python.exists():
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip() == SDK_REQUIREMENT.split("==")[1]:
            return python
        shutil.rmtree(SDK_VENV)
    TOOLS.mkdir(exist_ok=True)
    ignore = TOOLS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    building = TOOLS / f"fly-sdk-venv.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(building)],
             [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", SDK_REQUIREMENT]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise RuntimeError(f"{' '.join(step)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    # The venv's scripts name their folder; it moves whole, so fix nothing but use `python -m`.
    os.replace(building, SDK_VENV)
    return python
