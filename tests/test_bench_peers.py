"""bench/peers.py's helpers (bench/run's peers: nginx-proxy and superfly/tokenizer), without starting anything."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import stat
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def load_peers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


peers = load_peers()


def test_tokenizer_secret_is_the_injection_rule() -> None:
    secret = peers.tokenizer_secret("up-cred", "client-secret", "127.0.0.1:8443")
    assert secret == {
        "inject_processor": {"token": "up-cred"},  # default destination: Authorization: Bearer <token>
        # tokenizer's BearerAuthConfig.Digest is []byte: base64 in JSON, of SHA-256 of the client secret
        "bearer_auth": {"digest": base64.b64encode(hashlib.sha256(b"client-secret").digest()).decode()},
        "allowed_hosts": ["127.0.0.1:8443"],
    }


def test_credentials_needing_escapes_are_refused() -> None:
    assert peers.credential_is_safe("bench-upstream-credential")
    assert peers.credential_is_safe("fo1_AbC+/=.~")
    for bad in ('a"b', "a b", "a$b", "a;b", "a'b", ""):
        assert not peers.credential_is_safe(bad), bad


def test_find_tokenizer_prefers_the_environment_then_tools(tmp_path: Path) -> None:
    binary = tmp_path / "tok"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    assert peers.find_tokenizer(tmp_path, {"TOKENIZER": str(binary)}) == (binary, f"$TOKENIZER={binary}")
    missing, why = peers.find_tokenizer(tmp_path, {"TOKENIZER": str(tmp_path / "nope")})
    assert missing is None and "is not an executable file" in why
    missing, why = peers.find_tokenizer(tmp_path, {})
    assert missing is None and "bench/README.md" in why
    local = tmp_path / ".tools" / "bin" / "tokenizer"
    local.parent.mkdir(parents=True)
    local.write_text("#!/bin/sh\n")
    local.chmod(local.stat().st_mode | stat.S_IXUSR)
    assert peers.find_tokenizer(tmp_path, {}) == (local, ".tools/bin/tokenizer")


def test_a_file_without_the_x_bit_is_not_a_tokenizer(tmp_path: Path) -> None:
    binary = tmp_path / "tok"
    binary.write_text("")
    binary.chmod(0o644)  # no execute bit for anyone: not executable even for root (Linux)
    assert peers.find_tokenizer(tmp_path, {"TOKENIZER": str(binary)})[0] is None


def test_the_checked_upstream_and_the_proxy_carry_the_credential() -> None:
    tls = peers.CHECKED_TLS.format(tls_port=8443, cert="/c.pem", key="/k.pem")
    upstream = peers.CHECKED_UPSTREAM.format(plain_port=8081, tls=tls, credential="cred", body="{}")
    assert 'if ($http_authorization != "Bearer cred")' in upstream
    assert "listen 127.0.0.1:8443 ssl" in upstream and "listen 127.0.0.1:8081 " in upstream
    proxy = peers.NGINX_PROXY_CONF.format(folder="/f", port=9000, upstream_port=8081, credential="cred")
    assert 'proxy_set_header Authorization "Bearer cred";' in proxy
    assert "server 127.0.0.1:8081;" in proxy and "keepalive 64;" in proxy


def result(rps: float, cpu: float | None) -> dict[str, float | None]:
    return {"rps": rps, "p50_us": 1.0, "p99_us": 2.0, "cpu_us_per_request": cpu}


def test_peer_ratio_lines_state_the_gateway_against_each_peer() -> None:
    http = {
        "gateway": {1: result(3000, 300), 10: result(5000, 150)},
        "tokenizer": {1: result(750, 1000), 10: result(1250, 700)},
        "peer_ratio": {"tokenizer": {1: 4.0, 10: 4.0}},
    }
    lines = peers.peer_ratio_lines(http, (1, 10))
    assert [ln["metric"] for ln in lines] == [
        "gateway / tokenizer req/s, c=1", "gateway / tokenizer req/s, c=10",
        "server CPU per request, gateway / tokenizer, c=10"]
    assert lines[0]["value"] == "4.00x (3,000 / 750)"
    assert lines[2]["value"] == "0.21x (150 / 700 µs)"
    assert {ln["status"] for ln in lines} == {"info"}
    assert peers.peer_ratio_lines({"gateway": {}}, (1,)) == []  # --skip peers, or no peer built
