"""A real image registry on loopback: Debian's `docker-registry` (CNCF distribution 2.8) started in
a folder of its own, with htpasswd basic auth for one user, the way Fly's registry takes its
credential (user `x`, password the token). Dev mode (`scopegate serve --dev`) puts it behind the
gateway's `/v2/...`, and the registry tests (tests/test_registry.py) push and pull through it, so
the credential the gateway injects is checked by a real registry, not a stand-in.

The registry reads only bcrypt htpasswd lines; the hash comes from the system's libcrypt
(libxcrypt, in every Debian), so no Python package is needed for it. Every request it serves is
written to `access.log` (Apache combined format), which the tests read to prove that a refused
request never reached it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import http.client
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARY = "docker-registry"
INSTALL_HINT = "apt-get install docker-registry (Debian's CNCF distribution 2.8; .ci/run installs it)"


def bcrypt_hash(password: str) -> str:
    """A `$2b$` hash of `password`, as htpasswd -B writes it (cost 5: a test registry, not a vault)."""
    lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)
    hashed = lib.crypt(password.encode("utf-8"), salt) if salt else None
    if not hashed or not hashed.startswith(b"$2b$"):
        raise RuntimeError("libcrypt cannot make bcrypt hashes here")
    return str(hashed.decode("ascii"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRegistry:
    """`docker-registry serve` on 127.0.0.1:<free port>, storing under `folder`, one basic-auth user."""

    def __init__(self, folder: Path, *, user: str, password: str) -> None:
        self.folder = folder
        self.user = user
        self.password = password
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.folder / "access.log"

    def start(self) -> LocalRegistry:
        binary = shutil.which(BINARY) or shutil.which(BINARY, path="/usr/bin:/usr/sbin")
        if binary is None:
            raise RuntimeError(f"{BINARY} is not installed: {INSTALL_HINT}")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "htpasswd").write_text(f"{self.user}:{bcrypt_hash(self.password)}\n")
        for _ in range(3):  # the free port can be taken between finding and binding it
            self.port = free_port()
            (self.folder / "config.yml").write_text(self._config())
            with (self.access_log.open("ab") as out, (self.folder / "registry.log").open("ab") as err):
                self.process = subprocess.Popen([binary, "serve", str(self.folder / "config.yml")],
                                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"{BINARY} did not start; see {self.folder / 'registry.log'}")

    def _config(self) -> str:
        # distribution's own YAML: storage in the folder, deletes allowed (for images:delete),
        # no background purge, basic auth from the htpasswd file, loopback only.
        return f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {self.folder / 'data'}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{self.port}
  secret: {secrets.token_hex(16)}
auth:
  htpasswd:
    realm: upstream-registry
    path: {self.folder / 'htpasswd'}
"""

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/v2/")
                status = connection.getresponse().status
                connection.close()
                if status == 401:  # up, and asking for the credential
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
