"""A real OIDC issuer on loopback for the token-exchange tests, and the id tokens it signs.

`FakeIssuer` serves `/.well-known/openid-configuration` and a JWKS over HTTP (uvicorn in a
thread), holds its own RSA or EC signing keys, rotates them on demand, can make its JWKS
endpoint fail, and counts what it serves. `forge_*` build the hostile tokens (alg none, HS256
keyed with the issuer's public key) by hand, since no JOSE library will produce them.
The tests at the bottom check the issuer itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from tests.servers import ServerThread

AUDIENCE = "https://scopegate.test"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key(kind: str = "RSA", kid: str | None = None) -> RSAKey | ECKey:
    kid = kid or f"{kind.lower()}-{uuid.uuid4().hex[:8]}"
    if kind == "RSA":
        return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})
    return ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig", "alg": "ES256"})


def github_claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a GitHub Actions id token for a push to main of acme/web."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "jti": uuid.uuid4().hex, "iss": issuer, "aud": AUDIENCE,
        "sub": "repo:acme/web:ref:refs/heads/main", "repository": "acme/web", "repository_id": "123456",
        "repository_owner": "acme", "repository_owner_id": "4242", "ref": "refs/heads/main", "ref_type": "branch",
        "sha": "0123456789abcdef0123456789abcdef01234567", "event_name": "push", "actor": "octocat",
        "workflow_ref": "acme/web/.github/workflows/deploy.yml@refs/heads/main",
        "job_workflow_ref": "acme/web/.github/workflows/deploy.yml@refs/heads/main",
        "run_id": "9876543210", "run_attempt": "1", "runner_environment": "github-hosted",
        "iat": now, "nbf": now - 5, "exp": now + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def gitlab_claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a GitLab CI `id_tokens:` token for a protected main branch pipeline."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "jti": str(uuid.uuid4()), "iss": issuer, "aud": AUDIENCE,
        "sub": "project_path:acme/api:ref_type:branch:ref:main", "namespace_id": "77", "namespace_path": "acme",
        "project_id": "2200", "project_path": "acme/api", "user_login": "alice", "pipeline_id": "555001",
        "pipeline_source": "push", "job_id": "888002", "ref": "main", "ref_type": "branch",
        "ref_path": "refs/heads/main",
        "ref_protected": "true", "environment": "staging", "iat": now, "nbf": now - 5, "exp": now + 3600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


class FakeIssuer:
    """An OIDC issuer on a loopback port: discovery document, JWKS and signing keys."""

    def __init__(self, kind: str = "RSA", kid: str | None = None) -> None:
        self.signing = new_key(kind, kid)
        self.published: list[RSAKey | ECKey] = [self.signing]
        self.jwks_status = 200
        self.discovery_requests = 0
        self.jwks_requests = 0
        self.server = ServerThread(self)

    def start(self) -> FakeIssuer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.as_dict(private=False) for key in self.published]}

    def rotate(self, kind: str = "RSA", kid: str | None = None, *, keep_old: bool = False) -> RSAKey | ECKey:
        """A new signing key; the JWKS then publishes it (and the old one only with keep_old)."""
        self.signing = new_key(kind, kid)
        self.published = [*self.published, self.signing] if keep_old else [self.signing]
        return self.signing

    def sign(self, claims: dict[str, Any], key: RSAKey | ECKey | None = None, **header: Any) -> str:
        key = key or self.signing
        alg = "RS256" if isinstance(key, RSAKey) else "ES256"
        return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT", **header}, claims, key)

    def github_token(self, **overrides: Any) -> str:
        # GitHub's headers also carry an x5t (certificate thumbprint), which verification ignores.
        x5t = b64url(hashlib.sha1(str(self.signing.kid).encode(), usedforsecurity=False).digest())
        return self.sign(github_claims(self.url, **overrides), x5t=x5t)

    def gitlab_token(self, **overrides: Any) -> str:
        return self.sign(gitlab_claims(self.url, **overrides))

    def public_pem(self) -> bytes:
        pem = self.signing.as_pem(private=False)
        return pem if isinstance(pem, bytes) else pem.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        status: int = 404
        body: dict[str, Any] = {"error": "not_found"}
        if path == "/.well-known/openid-configuration":
            self.discovery_requests += 1
            status, body = 200, {
                "issuer": self.url, "jwks_uri": f"{self.url}/.well-known/jwks",
                "subject_types_supported": ["public", "pairwise"], "response_types_supported": ["id_token"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository"],
                "scopes_supported": ["openid"]}
        elif path == "/.well-known/jwks":
            self.jwks_requests += 1
            status, body = self.jwks_status, self.jwks() if self.jwks_status == 200 else {"error": "unavailable"}
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def forge_unsigned(claims: dict[str, Any], kid: str) -> str:
    """`alg: none`, no signature."""
    header = b64url(json.dumps({"alg": "none", "kid": kid, "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def forge_hs256(claims: dict[str, Any], kid: str, secret: bytes) -> str:
    """HS256 keyed with `secret` (the classic attack: the issuer's *public* key as the HMAC secret)."""
    signing_input = f"{b64url(json.dumps({'alg': 'HS256', 'kid': kid, 'typ': 'JWT'}).encode())}." \
                    f"{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


# --- the issuer itself --------------------------------------------------------------------------

def test_fake_issuer_serves_discovery_and_a_public_jwks() -> None:
    issuer = FakeIssuer().start()
    try:
        with httpx.Client(base_url=issuer.url, timeout=5) as client:
            discovery = client.get("/.well-known/openid-configuration").json()
            assert discovery["issuer"] == issuer.url
            keys = client.get(discovery["jwks_uri"]).json()["keys"]
        assert [k["kid"] for k in keys] == [issuer.signing.kid]
        assert "d" not in keys[0] and keys[0]["kty"] == "RSA"
        old = issuer.signing.kid
        issuer.rotate("EC")
        assert [k["kid"] for k in issuer.jwks()["keys"]] == [issuer.signing.kid] != [old]
    finally:
        issuer.stop()


def test_forged_tokens_have_the_advertised_headers() -> None:
    unsigned = forge_unsigned({"iss": "x"}, "k1")
    assert unsigned.endswith(".")
    assert json.loads(base64.urlsafe_b64decode(unsigned.split(".")[0] + "=="))["alg"] == "none"
    forged = forge_hs256({"iss": "x"}, "k1", b"public")
    header = forged.split(".")[0]
    assert json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["alg"] == "HS256"
