"""Peers for bench/run: other credential-injecting proxies measured in the same run as the gateway.

- **nginx-proxy**: nginx (1 worker) as a reverse proxy with a keep-alive upstream pool that sets
  `Authorization: Bearer <credential>` on every request: the simplest credential-injecting proxy,
  no client authentication; the physical ceiling for a proxy on this machine.
- **tokenizer**: Fly's own credential-injecting proxy, github.com/superfly/tokenizer, an HTTP
  forward proxy. The client sends an absolute-form request through it with a `Proxy-Tokenizer`
  header (a secret sealed to the tokenizer's public key) and `Proxy-Authorization: Bearer
  <client secret>`; tokenizer opens the secret, checks the client secret against the digest it
  holds and the upstream host against its allow-list, and sets `Authorization: Bearer
  <credential>` on the request it sends upstream. As shipped, it dials every upstream over TLS,
  opens a new upstream connection per request (keep-alive off) and answers `Connection: close`,
  so each request costs a client connection and an upstream TLS handshake: the bench gives it a
  TLS port on the upstream nginx and a self-signed certificate it trusts (SSL_CERT_FILE).

Both reach the upstream nginx on a *checked* server block that answers 401 unless
`Authorization` is exactly `Bearer <credential>`, so a peer that did not inject fails the run.
The binary comes from `$TOKENIZER` or `.tools/bin/tokenizer` (see bench/README.md); without it
the run says so and goes on without tokenizer.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import ipaddress
import json
import os
import re
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PEERS = ("nginx-proxy", "tokenizer")
TOKENIZER_ENV = "TOKENIZER"
# Characters that need no quoting in an nginx string or a JSON string.
_SAFE_CREDENTIAL = re.compile(r"[A-Za-z0-9._~+/=-]+")

# Server blocks added to the upstream nginx's http {} for the peers: a plain port and a TLS port
# (tokenizer's), both answering 401 unless the injected credential is there.
CHECKED_UPSTREAM = """\
    server {{
        listen 127.0.0.1:{plain_port} backlog=4096;
{tls}        location / {{
            default_type application/json;
            if ($http_authorization != "Bearer {credential}") {{
                return 401 '{{"error":"the upstream credential was not injected"}}';
            }}
            return 200 '{body}';
        }}
    }}
"""

CHECKED_TLS = """\
        listen 127.0.0.1:{tls_port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
"""

NGINX_PROXY_CONF = """\
worker_processes 1;
daemon off;
pid {folder}/nginx-proxy.pid;
error_log {folder}/nginx-proxy-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {folder}/nginx-proxy-body;
    proxy_temp_path {folder}/nginx-proxy-proxy;
    fastcgi_temp_path {folder}/nginx-proxy-fastcgi;
    uwsgi_temp_path {folder}/nginx-proxy-uwsgi;
    scgi_temp_path {folder}/nginx-proxy-scgi;
    upstream checked {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://checked;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {credential}";
            proxy_buffering off;
        }}
    }}
}}
"""


def credential_is_safe(credential: str) -> bool:
    """The peers' configurations quote the credential; refuse anything that would need escaping."""
    return bool(_SAFE_CREDENTIAL.fullmatch(credential))


def find_tokenizer(repo: Path, environ: dict[str, str] | None = None) -> tuple[Path | None, str]:
    """The tokenizer binary to run, and a sentence: where it came from, or why there is none."""
    env = os.environ if environ is None else environ
    given = env.get(TOKENIZER_ENV, "")
    if given:
        path = Path(given)
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"${TOKENIZER_ENV}={path}"
        return None, f"${TOKENIZER_ENV}={given} is not an executable file"
    local = repo / ".tools" / "bin" / "tokenizer"
    if local.is_file() and os.access(local, os.X_OK):
        return local, str(local.relative_to(repo))
    return None, ("no $TOKENIZER and no .tools/bin/tokenizer (the Go module proxy refuses "
                  "github.com/superfly/tokenizer: build cmd/tokenizer from a checkout, see bench/README.md)")


def tokenizer_secret(credential: str, client_secret: str, upstream_host: str) -> dict[str, object]:
    """The injection rule, as tokenizer's secret JSON: inject `Authorization: Bearer <credential>`
    (inject_processor's default), only for a client presenting `Proxy-Authorization: Bearer
    <client_secret>` (bearer_auth: its SHA-256 digest), only towards `upstream_host` (host:port)."""
    digest = base64.b64encode(hashlib.sha256(client_secret.encode()).digest()).decode()
    return {"inject_processor": {"token": credential}, "bearer_auth": {"digest": digest},
            "allowed_hosts": [upstream_host]}


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """An ECDSA P-256 certificate for 127.0.0.1 (a day), for the upstream's TLS port."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "upstream-cert.pem", folder / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class TokenizerSetup:
    """Everything a run needs to drive tokenizer: how to start it and what each request carries."""

    binary: Path
    version: str
    open_key: str
    client_secret: str
    sealed: str
    upstream_host: str  # host:port of the upstream's TLS port, as the request targets it
    headers: dict[str, str] = field(default_factory=dict)

    def env(self, port: int, cert: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("OPEN_KEY", "SEAL_KEY", "DEBUG", "OPEN_PROXY")}
        env.update({"OPEN_KEY": self.open_key, "LISTEN_ADDRESS": f"127.0.0.1:{port}", "SSL_CERT_FILE": str(cert)})
        return env


def prepare_tokenizer(binary: Path, credential: str, upstream_host: str) -> TokenizerSetup:
    """A fresh key pair and client secret, and the secret sealed with tokenizer's own `seal` command."""
    open_key = secrets.token_hex(32)
    client_secret = secrets.token_urlsafe(24)
    secret = json.dumps(tokenizer_secret(credential, client_secret, upstream_host))
    env = {**os.environ, "OPEN_KEY": open_key}
    env.pop("SEAL_KEY", None)
    sealed = subprocess.run([str(binary), "seal", "-json", secret], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    if sealed.returncode != 0 or not sealed.stdout.strip():
        raise RuntimeError(f"`tokenizer seal` failed (exit {sealed.returncode}, "
                           f"{'output' if sealed.stdout.strip() else 'no sealed secret printed'}): "
                           f"{sealed.stderr.strip()[-300:]}")
    version = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30, check=False)
    token = sealed.stdout.strip()
    headers = {"Host": upstream_host, "Proxy-Tokenizer": token, "Proxy-Authorization": f"Bearer {client_secret}"}
    return TokenizerSetup(binary, (version.stderr or version.stdout).strip() or "tokenizer (version unknown)",
                          open_key, client_secret, token, upstream_host, headers)


def proxy_get(proxy_port: int, url: str, headers: dict[str, str], timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET of absolute `url` through the forward proxy on 127.0.0.1:`proxy_port`."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=timeout)
    try:
        conn.request("GET", url, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def peer_ratio_lines(http: dict[str, object], concurrencies: tuple[int, ...]) -> list[dict[str, str]]:
    """`info` lines: the gateway's req/s against each peer's, per concurrency (median of ratios paired
    within a round), and the server CPU per request at c=10."""
    lines: list[dict[str, str]] = []
    ratios = http.get("peer_ratio")
    if not isinstance(ratios, dict):
        return lines
    gateway = http["gateway"]
    assert isinstance(gateway, dict)
    for peer in PEERS:
        if peer not in ratios:
            continue
        measured = http[peer]
        assert isinstance(measured, dict)
        for c in concurrencies:
            ratio = ratios[peer][c]
            lines.append({"metric": f"gateway / {peer} req/s, c={c}",
                          "value": f"{ratio:.2f}x ({gateway[c]['rps']:,.0f} / {measured[c]['rps']:,.0f})",
                          "budget": "info (peer, same run)", "status": "info"})
        c = 10 if 10 in concurrencies else concurrencies[0]
        gcpu, pcpu = gateway[c].get("cpu_us_per_request"), measured[c].get("cpu_us_per_request")
        if gcpu and pcpu:
            lines.append({"metric": f"server CPU per request, gateway / {peer}, c={c}",
                          "value": f"{gcpu / pcpu:.2f}x ({gcpu:.0f} / {pcpu:.0f} µs)",
                          "budget": "info (peer, same run)", "status": "info"})
    return lines
