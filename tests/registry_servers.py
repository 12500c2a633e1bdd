"""Helpers for the registry tests: a real upstream registry whose access log says what reached it,
small OCI images made in a temp dir, and the real clients (skopeo from Debian, crane from its Go
module) run against the gateway."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.dev.local_registry import LocalRegistry

REPO = Path(__file__).resolve().parent.parent
CRANE = REPO / ".tools/bin/crane"
_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


def skopeo() -> str:
    found = shutil.which("skopeo")
    assert found, "skopeo is not installed: apt-get install skopeo (.ci/run installs it)"
    return found


def crane() -> str:
    assert CRANE.exists(), "crane is not installed: run scripts/install-test-tools (builds it into .tools/bin)"
    return str(CRANE)


class UpstreamLog:
    """What the real registry served, from its access log. `mark()` and `since(mark)` each wait
    for a sentinel request sent straight to the registry, so every line a gateway request caused
    before it is written: what `since` lists is all the gateway forwarded in between."""

    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry

    def lines(self) -> list[tuple[str, str, int]]:
        text = self.registry.access_log.read_text() if self.registry.access_log.exists() else ""
        return [(m["method"], m["target"], int(m["status"])) for m in _LINE.finditer(text)]

    def mark(self) -> int:
        """Where the log is once every earlier request is written (after a sentinel of its own)."""
        return len(self._sync())

    def since(self, mark: int) -> list[tuple[str, str, int]]:
        return [line for line in self._sync()[mark:] if "/sentinel-" not in line[1]]

    def _sync(self) -> list[tuple[str, str, int]]:
        """The log up to a sentinel request sent straight to the registry now: a request that
        reached it before is written by then (distribution writes each line when it answers)."""
        sentinel = f"/v2/sentinel-{uuid.uuid4().hex[:12]}/tags/list"
        httpx.get(self.registry.url + sentinel, timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = self.lines()
            for index, line in enumerate(lines):
                if line[1] == sentinel:
                    return lines[:index + 1]
            time.sleep(0.02)
        raise AssertionError("the registry never logged the sentinel request")


@dataclass(frozen=True)
class OciImage:
    layout: Path  # an OCI image layout directory (skopeo's `oci:` transport)
    tag: str
    manifest_digest: str
    layer_digest: str
    layer: bytes  # the compressed layer, as pushed

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def layer_tar(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
    return raw.getvalue()


def make_image(folder: Path, tag: str, files: dict[str, bytes]) -> OciImage:
    """A one-layer image in an OCI layout under `folder` (a few hundred bytes plus `files`)."""
    layout = folder / f"oci-{tag}"
    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    tar = layer_tar(files)
    layer = gzip.compress(tar, mtime=0)
    layer_digest = _blob(layout, layer)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]}})
    config_digest = _blob(layout, config.encode())
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": len(layer)}]}).encode()
    manifest_digest = _blob(layout, manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return OciImage(layout, tag, manifest_digest, layer_digest, layer)


@dataclass
class Clients:
    """skopeo and crane with a home of their own (no shared auth file or blob-info cache)."""

    home: Path
    host: str  # the gateway's host:port, what FLY_REGISTRY_HOST would be

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                "DOCKER_CONFIG": str(self.home / ".docker"), "REGISTRY_AUTH_FILE": str(self.home / "auth.json"),
                "TMPDIR": str(self.home)}

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        self.home.mkdir(parents=True, exist_ok=True)
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=self.env(),
                              check=False)

    def skopeo_copy(self, source: str, destination: str, token: str) -> subprocess.CompletedProcess[str]:
        creds = f"x:{token}"
        return self.run(skopeo(), "--insecure-policy", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                        "--src-creds", creds, "--dest-creds", creds, source, destination)

    def skopeo(self, command: str, reference: str, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """`skopeo inspect|delete|list-tags` on a docker:// reference, logged in with `token`."""
        return self.run(skopeo(), "--insecure-policy", command, "--tls-verify=false", "--creds", f"x:{token}",
                        *extra, reference)

    def crane_login(self, token: str) -> subprocess.CompletedProcess[str]:
        return self.run(crane(), "auth", "login", self.host, "-u", "x", "-p", token, "--insecure")

    def crane(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(crane(), "--insecure", *args)

    def crane_bytes(self, *args: str) -> bytes:
        """What crane prints (a blob), as bytes; fails naming crane's own message."""
        done = subprocess.run([crane(), "--insecure", *args], capture_output=True, timeout=60, env=self.env(),
                              check=False)
        assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
        return done.stdout
