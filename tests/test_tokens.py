"""Tokens (DESIGN section 3): minting, strict verification, the verify cache, and the client header.

The first half tests `TokenIssuer`/`TokenVerifier`/`bearer_token` directly over an in-memory
keyring. The second half sends the same forged tokens, and the request-level tricks, through a
real gateway: each must end in 401 `unauthenticated` with `WWW-Authenticate: Bearer
error="invalid_token"`, and the upstream must receive nothing.

Forged tokens are hand-built (base64url header and payload, signed with cryptography's Ed25519)
so that each case differs from a valid token in exactly one respect; the untouched baseline is
tested to be accepted, and through the gateway every forged jti is registered in the store, so
"not registered" can never be the reason a case is refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.core.grants import parse_grant
from gateway.core.keyring import Keyring, new_key
from gateway.core.tokens import MAX_TOKEN_BYTES, PREFIX, Claims, TokenIssuer, TokenVerifier, bearer_token
from gateway.errors import Unauthenticated
from gateway.store import TokenRecord
from gateway.store.backends import open_store
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.servers import RecordingUpstream, ServerThread, raw_request

ISSUER = "scopegate-test"
AUDIENCE = "scopegate-test-aud"
GRANT = "viewer@app:web-staging"
TARGET = "/v1/apps/web-staging/machines"  # viewer@app:web-staging may GET it (truth table)
INVALID_TOKEN = 'Bearer error="invalid_token"'
REQUIRED = ("iss", "aud", "sub", "jti", "iat", "nbf", "exp", "name", "grants")
JTI_SHAPE = re.compile(r"[A-Za-z0-9_-]{22,}")


# --- hand-built tokens ------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


class Forged(NamedTuple):
    token: str
    jti: str | None  # registered in the store for the gateway cases, when there is one


@dataclass(frozen=True)
class Forge:
    keyring: Keyring
    issuer: str
    audience: str

    def header(self, **extra: Any) -> dict[str, Any]:
        return {"alg": "EdDSA", "typ": "JWT", "kid": self.keyring.active.kid, **extra}

    def payload(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": "test:forger", "jti": secrets.token_urlsafe(20),
            "iat": now, "nbf": now, "exp": now + 600, "name": "forged", "grants": [GRANT],
        }
        claims.update(changes)
        return claims

    def sign(self, header: dict[str, Any], payload: dict[str, Any] | bytes,
             key: Ed25519PrivateKey | None = None) -> str:
        body = payload if isinstance(payload, bytes) else compact(payload)
        signing_input = f"{b64(compact(header))}.{b64(body)}"
        signer = key if key is not None else self.keyring.active.private_key
        return f"{PREFIX}{signing_input}.{b64(signer.sign(signing_input.encode('ascii')))}"

    def hmac_sign(self, header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
        signing_input = f"{b64(compact(header))}.{b64(compact(payload))}"
        mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
        return f"{PREFIX}{signing_input}.{b64(mac)}"


Builder = Callable[[Forge], Forged]


def _jti(payload: dict[str, Any]) -> str | None:
    value = payload.get("jti")
    return value if isinstance(value, str) else None


def baseline(f: Forge) -> Forged:
    payload = f.payload()
    return Forged(f.sign(f.header(), payload), _jti(payload))


def with_claims(**changes: Any) -> Builder:
    def build(f: Forge) -> Forged:
        payload = f.payload(**changes)
        return Forged(f.sign(f.header(), payload), _jti(payload))
    return build


def without_claim(claim: str) -> Builder:
    def build(f: Forge) -> Forged:
        payload = f.payload()
        del payload[claim]
        return Forged(f.sign(f.header(), payload), _jti(payload))
    return build


def with_header(**extra: Any) -> Builder:
    """Signed with the real key; only the header differs."""
    def build(f: Forge) -> Forged:
        payload = f.payload()
        return Forged(f.sign(f.header(**extra), payload), _jti(payload))
    return build


def without_kid(f: Forge) -> Forged:
    payload = f.payload()
    header = f.header()
    del header["kid"]
    return Forged(f.sign(header, payload), _jti(payload))


def bad_signature(f: Forge) -> Forged:
    token, jti = baseline(f)
    head, _, signature = token.rpartition(".")
    # A middle character: all six of its bits are signature bits (the last one has padding bits).
    i = len(signature) // 2
    flipped = "A" if signature[i] != "A" else "B"
    return Forged(f"{head}.{signature[:i]}{flipped}{signature[i + 1:]}", jti)


def foreign_key_same_kid(f: Forge) -> Forged:
    payload = f.payload()
    return Forged(f.sign(f.header(), payload, key=Ed25519PrivateKey.generate()), _jti(payload))


def foreign_key_embedded_jwk(f: Forge) -> Forged:
    foreign = new_key()
    payload = f.payload()
    header = {"alg": "EdDSA", "typ": "JWT", "jwk": foreign.jwk()}
    return Forged(f.sign(header, payload, key=foreign.private_key), _jti(payload))


def alg_none(f: Forge) -> Forged:
    payload = f.payload()
    return Forged(f"{PREFIX}{b64(compact(f.header(alg='none')))}.{b64(compact(payload))}.", _jti(payload))


def hs256_with_raw_public_key(f: Forge) -> Forged:
    payload = f.payload()
    return Forged(f.hmac_sign(f.header(alg="HS256"), payload, f.keyring.active.public_bytes()), _jti(payload))


def hs256_with_pem_public_key(f: Forge) -> Forged:
    payload = f.payload()
    pem = f.keyring.active.public_key.public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return Forged(f.hmac_sign(f.header(alg="HS256"), payload, pem), _jti(payload))


def duplicate_claim(claim: str, value: Any, *, escaped_name: str | None = None) -> Builder:
    """The valid payload with `claim` appended a second time (json.loads would keep this one)."""
    def build(f: Forge) -> Forged:
        payload = f.payload()
        name = escaped_name if escaped_name is not None else claim
        body = compact(payload)[:-1] + b',"' + name.encode("ascii") + b'":' + compact(value) + b"}"
        return Forged(f.sign(f.header(), body), _jti(payload))
    return build


def duplicate_header_field(f: Forge) -> Forged:
    """A header naming `kid` twice (the first an unknown key): which one counts depends on the parser."""
    payload = f.payload()
    header = b'{"alg":"EdDSA","kid":"no-such-kid-0000","kid":"' + f.keyring.active.kid.encode() + b'"}'
    signing_input = f"{b64(header)}.{b64(compact(payload))}"
    signature = f.keyring.active.private_key.sign(signing_input.encode("ascii"))
    return Forged(f"{PREFIX}{signing_input}.{b64(signature)}", _jti(payload))


def utf16_payload(f: Forge) -> Forged:
    payload = f.payload()
    return Forged(f.sign(f.header(), json.dumps(payload).encode("utf-16")), _jti(payload))


@dataclass(frozen=True)
class Case:
    name: str
    build: Builder
    reason: str  # fragments ("a|b": either) the 401 message must contain: refused for its own reason


NOW = int(time.time())
FORGED: list[Case] = [
    Case("bad signature (one char flipped)", bad_signature, "signature"),
    Case("foreign Ed25519 key, same kid", foreign_key_same_kid, "signature"),
    Case("foreign key embedded as jwk header", foreign_key_embedded_jwk, "header"),
    Case("alg none", alg_none, "algorithm"),
    Case("HS256 keyed with raw public key (alg confusion)", hs256_with_raw_public_key, "algorithm"),
    Case("HS256 keyed with PEM public key (alg confusion)", hs256_with_pem_public_key, "algorithm"),
    Case("jku header", with_header(jku="https://evil.example/jwks.json"), "header"),
    Case("jwk header (our own public key)", lambda f: with_header(jwk=f.keyring.active.jwk())(f), "header"),
    Case("x5u header", with_header(x5u="https://evil.example/cert.pem"), "header"),
    Case("x5c header", with_header(x5c=["MIIB"]), "header"),
    Case("crit header (extension pyjwt does not know)", with_header(crit=["exp"]), "header|malformed"),
    Case("crit header (b64, an extension pyjwt knows)", with_header(crit=["b64"], b64=True), "header"),
    Case("b64 header without crit", with_header(b64=True), "header"),
    Case("header field kid twice", duplicate_header_field, "twice"),
    Case("payload in UTF-16 (JSON allows it, one spelling per token does not)", utf16_payload, "encoding"),
    Case("kid unknown", with_header(kid="no-such-kid-0000"), "key"),
    Case("kid path traversal", with_header(kid="../../etc/passwd"), "key"),
    Case("kid missing", without_kid, "key"),
    Case("kid not a string", with_header(kid=7), "key|malformed"),
    Case("expired", with_claims(iat=NOW - 7200, nbf=NOW - 7200, exp=NOW - 3600), "expired"),
    Case("nbf in the future", with_claims(nbf=NOW + 3600, exp=NOW + 7200), "not valid yet"),
    Case("iat in the future", with_claims(iat=NOW + 3600, exp=NOW + 7200), "not valid yet"),
    Case("wrong audience", with_claims(aud="someone-else"), "audience"),
    Case("audience as a list", lambda f: with_claims(aud=[f.audience])(f), "audience"),
    Case("wrong issuer", with_claims(iss="someone-else"), "issuer"),
    *[Case(f"missing claim {claim}", without_claim(claim), f"'{claim}'") for claim in REQUIRED],
    Case("duplicated claim grants (escalation)", duplicate_claim("grants", ["admin@app:*"]), "twice"),
    Case("duplicated claim exp (longer life)", duplicate_claim("exp", NOW + 10 * 365 * 86400), "twice"),
    Case("duplicated claim sub", duplicate_claim("sub", "admin:root"), "twice"),
    Case("duplicated claim via JSON escape", duplicate_claim("grants", ["admin@app:*"], escaped_name="gr\\u0061nts"),
         "twice"),
    Case("grants not a list", with_claims(grants=GRANT), "grants"),
    Case("grants an empty list", with_claims(grants=[]), "grants"),
    Case("grants with a non-string", with_claims(grants=[GRANT, 7]), "grants"),
    Case("grants with an unparseable grant", with_claims(grants=[GRANT, "viewer@app:WEB!"]), "grant"),
    Case("grants with a bracket glob", with_claims(grants=["viewer@app:[a-z]*"]), "grant"),
    Case("jti too short to be ours", with_claims(jti="abc"), "jti"),
    Case("exp not an integer", with_claims(exp=str(NOW + 600)), "token"),
    Case("token longer than 8192 bytes", with_claims(name="x" * 7000), str(MAX_TOKEN_BYTES)),
]
FORGED_IDS = [case.name for case in FORGED]


# --- unit: TokenVerifier over an in-memory keyring --------------------------------------------

@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def forge(keyring: Keyring) -> Forge:
    return Forge(keyring, ISSUER, AUDIENCE)


@pytest.fixture
def verifier(keyring: Keyring) -> TokenVerifier:
    return TokenVerifier(keyring, ISSUER, AUDIENCE)


def mentions(message: str, reason: str) -> bool:
    return any(part.lower() in message.lower() for part in reason.split("|"))


def assert_unauthenticated(error: Unauthenticated, reason: str) -> None:
    assert error.status == 401
    assert error.code == "unauthenticated"
    assert error.headers == {"WWW-Authenticate": INVALID_TOKEN}
    assert mentions(error.message, reason), error.message


def test_verifier_accepts_the_unforged_baseline(forge: Forge, verifier: TokenVerifier) -> None:
    token, jti = baseline(forge)
    claims = verifier.verify(token)
    assert claims.jti == jti
    assert claims.iss == ISSUER and claims.aud == AUDIENCE and claims.sub == "test:forger"
    assert claims.grants == (parse_grant(GRANT),)


@pytest.mark.parametrize("case", FORGED, ids=FORGED_IDS)
def test_verifier_refuses_forged_token(case: Case, forge: Forge, verifier: TokenVerifier) -> None:
    token = case.build(forge).token
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    assert_unauthenticated(caught.value, case.reason)
    # A refusal is not cached as a success: asking again is refused again.
    with pytest.raises(Unauthenticated):
        verifier.verify(token)
    assert verifier.cache_hits == 0


@pytest.mark.parametrize(("name", "mangle", "reason"), [
    ("prefix missing", lambda t: t[len(PREFIX):], "sgt_"),
    ("prefix upper-case", lambda t: "SGT_" + t[len(PREFIX):], "sgt_"),
    ("prefix doubled", lambda t: PREFIX + t, "malformed"),
    ("only the prefix", lambda t: PREFIX, "malformed"),
    ("two segments", lambda t: t.rpartition(".")[0], "token"),
    ("not base64 at all", lambda t: PREFIX + "!!!.???.***", "malformed"),
    ("trailing garbage", lambda t: t + ".extra", "token"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_verifier_refuses_malformed_token(name: str, mangle: Callable[[str], str], reason: str, forge: Forge,
                                          verifier: TokenVerifier) -> None:
    token = mangle(baseline(forge).token)
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    assert_unauthenticated(caught.value, reason)


def _token_of_length(forge: Forge, length: int) -> str:
    """A validly signed token exactly `length` characters long (padding the name claim)."""
    base = forge.payload(name="")
    for size in range(length):
        token = forge.sign(forge.header(), {**base, "name": "n" * size})
        if len(token) == length:
            return token
        if len(token) > length:
            break
    raise AssertionError(f"no name length gives a token of exactly {length} characters")


def test_token_of_exactly_max_bytes_is_accepted_one_more_is_refused(forge: Forge, verifier: TokenVerifier) -> None:
    at_limit = _token_of_length(forge, MAX_TOKEN_BYTES)
    assert verifier.verify(at_limit).name.startswith("n")
    over = _token_of_length(forge, MAX_TOKEN_BYTES + 1)
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(over)
    assert_unauthenticated(caught.value, str(MAX_TOKEN_BYTES))


def test_key_kept_for_verification_after_rotation_verifies_and_retired_key_does_not() -> None:
    old, current = new_key(), new_key()
    old_token, _ = TokenIssuer(Keyring([old]), ISSUER, AUDIENCE).mint(
        sub="test:old", name="old", grants=(parse_grant(GRANT),), ttl_s=600)
    rotated = Keyring([replace(old, status="verify"), current])
    assert TokenVerifier(rotated, ISSUER, AUDIENCE).verify(old_token).name == "old"
    retired = Keyring([replace(old, status="retired"), current])
    with pytest.raises(Unauthenticated) as caught:
        TokenVerifier(retired, ISSUER, AUDIENCE).verify(old_token)
    assert_unauthenticated(caught.value, "key")


def test_verifier_refuses_token_of_another_keyring_even_with_same_issuer_and_audience(keyring: Keyring) -> None:
    other, _ = TokenIssuer(Keyring.generate(), ISSUER, AUDIENCE).mint(
        sub="test:other", name="other", grants=(parse_grant(GRANT),), ttl_s=600)
    with pytest.raises(Unauthenticated):
        TokenVerifier(keyring, ISSUER, AUDIENCE).verify(other)


# --- unit: minting ----------------------------------------------------------------------------

def test_minted_claims_contain_everything_design_section_3_lists(keyring: Keyring) -> None:
    now = 1_900_000_000
    issuer = TokenIssuer(keyring, ISSUER, AUDIENCE, clock=lambda: now + 0.75)
    grants = (parse_grant("deployer@app:web-staging"), parse_grant("viewer@env:staging"))
    parent = "p" * 27
    token, claims = issuer.mint(sub="ci:github:acme/web", name="web-ci", grants=grants, ttl_s=900, parent=parent)
    assert token.startswith(PREFIX)
    raw = token[len(PREFIX):]
    header = jwt.get_unverified_header(raw)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == keyring.active.kid
    assert not {"jku", "jwk", "x5u", "x5c", "crit"} & set(header)
    payload = jwt.decode(raw, keyring.active.public_key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER,
                         options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
    assert set(REQUIRED) <= set(payload)
    assert payload["iss"] == ISSUER
    assert payload["aud"] == AUDIENCE
    assert payload["sub"] == "ci:github:acme/web"
    assert payload["name"] == "web-ci"
    assert payload["grants"] == ["deployer@app:web-staging", "viewer@env:staging"]
    assert payload["iat"] == now and payload["nbf"] == now
    assert payload["exp"] == now + 900
    assert payload["parent"] == parent
    assert payload["jti"] == claims.jti
    assert claims == Claims(iss=ISSUER, aud=AUDIENCE, sub="ci:github:acme/web", jti=claims.jti, iat=now, nbf=now,
                            exp=now + 900, name="web-ci", grants=grants, parent=parent)


def test_minted_token_without_parent_has_no_parent_claim(keyring: Keyring) -> None:
    token, claims = TokenIssuer(keyring, ISSUER, AUDIENCE).mint(
        sub="test:user", name="plain", grants=(parse_grant(GRANT),), ttl_s=60)
    payload = jwt.decode(token[len(PREFIX):], options={"verify_signature": False})
    assert "parent" not in payload
    assert claims.parent is None


def test_jti_has_at_least_128_random_bits(keyring: Keyring) -> None:
    issuer = TokenIssuer(keyring, ISSUER, AUDIENCE)
    jtis = [issuer.mint(sub="test:user", name="n", grants=(parse_grant(GRANT),), ttl_s=60)[1].jti
            for _ in range(200)]
    for jti in jtis:
        assert JTI_SHAPE.fullmatch(jti), jti  # 22 url-safe chars carry 132 bits
        assert len(base64.urlsafe_b64decode(jti + "=" * (-len(jti) % 4))) >= 16
    assert len(set(jtis)) == len(jtis)


def test_minted_token_round_trips_through_the_verifier(keyring: Keyring, verifier: TokenVerifier) -> None:
    token, claims = TokenIssuer(keyring, ISSUER, AUDIENCE).mint(
        sub="test:user", name="round-trip", grants=(parse_grant(GRANT), parse_grant("token-admin@gateway")),
        ttl_s=600, parent="q" * 27)
    assert verifier.verify(token) == claims


def test_token_minted_for_another_audience_or_issuer_is_refused(keyring: Keyring, verifier: TokenVerifier) -> None:
    for issuer_name, audience in ((ISSUER, "other-aud"), ("other-iss", AUDIENCE)):
        token, _ = TokenIssuer(keyring, issuer_name, audience).mint(
            sub="test:user", name="elsewhere", grants=(parse_grant(GRANT),), ttl_s=600)
        with pytest.raises(Unauthenticated):
            verifier.verify(token)


# --- unit: the verify cache (its memory bound: tests/test_token_cache.py) -----------------------

def cache_key(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_cache_serves_repeat_verifications(keyring: Keyring) -> None:
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
    token, claims = TokenIssuer(keyring, ISSUER, AUDIENCE).mint(
        sub="test:user", name="cached", grants=(parse_grant(GRANT),), ttl_s=60)
    assert verifier.verify(token) == claims
    assert verifier.cache_hits == 0
    assert verifier.verify(token) == claims
    assert verifier.verify(token) == claims
    assert verifier.cache_hits == 2


def test_cache_evicts_an_expired_token(keyring: Keyring) -> None:
    clock = FakeClock()
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, clock=clock)
    token, _ = TokenIssuer(keyring, ISSUER, AUDIENCE, clock=clock).mint(
        sub="test:user", name="short-lived", grants=(parse_grant(GRANT),), ttl_s=60)
    verifier.verify(token)
    verifier.verify(token)
    assert verifier.cache_hits == 1
    clock.now += 30  # still within its life
    verifier.verify(token)
    assert verifier.cache_hits == 2
    clock.now += 30 + 10  # past exp and the leeway
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    assert_unauthenticated(caught.value, "expired")
    assert verifier.cache_hits == 2
    assert cache_key(token) not in verifier._cache


def test_expired_token_stays_refused_after_cache_eviction(keyring: Keyring) -> None:
    """The verifier's clock decides expiry on both paths, cached and uncached."""
    clock = FakeClock()
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, clock=clock)
    token, _ = TokenIssuer(keyring, ISSUER, AUDIENCE, clock=clock).mint(
        sub="test:user", name="short-lived", grants=(parse_grant(GRANT),), ttl_s=60)
    verifier.verify(token)
    clock.now += 3600
    with pytest.raises(Unauthenticated):
        verifier.verify(token)  # cached path: refused and evicted
    with pytest.raises(Unauthenticated):
        verifier.verify(token)  # uncached path, same clock: must be refused too


def test_a_repeated_authorization_header_is_served_from_the_cache(keyring: Keyring) -> None:
    clock = FakeClock()
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, clock=clock)
    token, claims = TokenIssuer(keyring, ISSUER, AUDIENCE, clock=clock).mint(
        sub="test:user", name="header", grants=(parse_grant(GRANT),), ttl_s=60)
    header = [f"Bearer {token}".encode()]
    first = verifier.verify_authorization(header)
    assert first == claims and verifier.cache_hits == 0
    # The same Claims object each time (the request caches rely on its identity), from either door.
    assert verifier.verify_authorization([f"Bearer {token}".encode()]) is first
    assert verifier.verify(token) is first
    assert verifier.cache_hits == 2
    # Other spellings of the header are parsed as before and refused as before.
    assert verifier.verify_authorization([f"FlyV1 {token}".encode()]) is first
    for bad in ([], [header[0], header[0]], [f"Basic {token}".encode()], [f"Bearer {token},x".encode()]):
        with pytest.raises(Unauthenticated):
            verifier.verify_authorization(bad)
    # Expiry is checked on the header path too, with the verifier's clock.
    clock.now += 60 + 10
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify_authorization(header)
    assert_unauthenticated(caught.value, "expired")
    with pytest.raises(Unauthenticated):
        verifier.verify_authorization(header)


def test_clearing_the_cache_forgets_headers_too(keyring: Keyring) -> None:
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
    token, _ = TokenIssuer(keyring, ISSUER, AUDIENCE).mint(
        sub="test:user", name="header", grants=(parse_grant(GRANT),), ttl_s=60)
    header = [f"Bearer {token}".encode()]
    first = verifier.verify_authorization(header)
    verifier.clear_cache()  # what a keyring reload does: a retired key must stop verifying at once
    again = verifier.verify_authorization(header)
    assert again == first and again is not first
    assert verifier.cache_hits == 0


def test_every_spelling_of_a_header_shares_the_token_s_one_cache_entry(keyring: Keyring) -> None:
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
    token, _ = TokenIssuer(keyring, ISSUER, AUDIENCE).mint(
        sub="test:user", name="header", grants=(parse_grant(GRANT),), ttl_s=60)
    first = verifier.verify_authorization([f"Bearer {token}".encode()])
    for spaces in range(1, 200):  # extra spaces are accepted, parsed every time, and add no entry
        assert verifier.verify_authorization([b"Bearer" + b" " * (spaces * 300) + token.encode()]) is first
        assert verifier.verify_authorization([b"bEaReR " + token.encode()]) is first
    assert verifier.verify_authorization([f"FlyV1 {token}".encode()]) is first
    assert len(verifier._cache) == 1 and cache_key(token) in verifier._cache
    # Only the two plain spellings are remembered by their exact value too.
    assert set(verifier._recent) == {f"Bearer {token}".encode(), f"FlyV1 {token}".encode()}
    for odd in (f"Bearer {token} ", f"Bearer  {token}", f" Bearer {token}"):
        assert verifier.verify_authorization([odd.encode()]) is first
    assert len(verifier._recent) == 2


def test_uncached_verification_honours_the_verifier_clock_for_expiry(keyring: Keyring) -> None:
    clock = FakeClock()
    token, _ = TokenIssuer(keyring, ISSUER, AUDIENCE, clock=clock).mint(
        sub="test:user", name="short-lived", grants=(parse_grant(GRANT),), ttl_s=60)
    clock.now += 3600
    with pytest.raises(Unauthenticated):
        TokenVerifier(keyring, ISSUER, AUDIENCE, clock=clock).verify(token)


def test_clear_cache_forces_verification_again(keyring: Keyring) -> None:
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
    token, _ = TokenIssuer(keyring, ISSUER, AUDIENCE).mint(
        sub="test:user", name="n", grants=(parse_grant(GRANT),), ttl_s=600)
    verifier.verify(token)
    verifier.clear_cache()
    verifier.verify(token)
    assert verifier.cache_hits == 0


# --- unit: bearer_token -----------------------------------------------------------------------

@pytest.mark.parametrize(("values", "expected"), [
    ([b"Bearer sgt_abc"], "sgt_abc"),
    ([b"bearer sgt_abc"], "sgt_abc"),
    ([b"BEARER sgt_abc"], "sgt_abc"),
    ([b"FlyV1 sgt_abc"], "sgt_abc"),
    ([b"flyv1 sgt_abc"], "sgt_abc"),
    ([b"  Bearer   sgt_abc  "], "sgt_abc"),
], ids=["Bearer", "bearer", "BEARER", "FlyV1", "flyv1", "extra spaces"])
def test_bearer_token_accepts(values: list[bytes], expected: str) -> None:
    assert bearer_token(values) == expected


@pytest.mark.parametrize(("values", "reason"), [
    ([], "no token"),
    ([b"Bearer sgt_a", b"Bearer sgt_a"], "more than one"),
    ([b"Bearer sgt_a", b"Basic dXNlcjpwYXNz"], "more than one"),
    ([b"Basic dXNlcjpwYXNz"], "Bearer"),
    ([b"Basic sgt_abc"], "Bearer"),
    ([b"Token sgt_abc"], "Bearer"),
    ([b"sgt_abc"], "Bearer"),
    ([b"Bearer"], "Bearer"),
    ([b"Bearer   "], "Bearer"),
    ([b"Bearer\tsgt_abc"], "Bearer"),
    ([b"Bearer sgt_a sgt_b"], "more than one"),
    ([b"Bearer sgt_a,sgt_b"], "more than one"),
    ([b"Bearer sgt_\xc3\xa9"], "ASCII"),
], ids=["none", "two identical", "two different", "Basic credentials", "Basic with sgt token", "Token scheme",
        "no scheme", "scheme only", "scheme and spaces", "tab separator", "two tokens space", "two tokens comma",
        "non-ascii"])
def test_bearer_token_refuses(values: list[bytes], reason: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        bearer_token(values)
    assert_unauthenticated(caught.value, reason)


# --- through a real gateway -------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """One gateway for the refusal tables, which change nothing (conftest's `gateway` per case is ~0.4 s)."""
    recorder = RecordingUpstream()
    recorder_server = ServerThread(recorder).start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
            running = start_gateway(tmp_path_factory.mktemp("tokens-gateway"), recorder, recorder_server)
            try:
                yield running
            finally:
                running.server.stop()
    finally:
        recorder_server.stop()


@pytest.fixture
def gw(shared_gateway: RunningGateway) -> RunningGateway:
    shared_gateway.upstream.clear()
    return shared_gateway


def gateway_forge(gateway: RunningGateway) -> Forge:
    return Forge(gateway.services.keyring, gateway.config.tokens_issuer, gateway.config.tokens_audience)


def register(gateway: RunningGateway, jti: str) -> None:
    """Put a live record for `jti` in the gateway's store, as minting would."""
    async def run() -> None:
        store = open_store(gateway.config)
        try:
            now = int(time.time())
            await store.put(TokenRecord(jti=jti, sub="test:forger", name="forged", grants=(GRANT,), iat=now,
                                        exp=now + 600))
        finally:
            await store.close()

    asyncio.run(run())


def jti_of(token: str) -> str:
    payload = jwt.decode(token[len(PREFIX):], options={"verify_signature": False})
    jti = payload["jti"]
    assert isinstance(jti, str)
    return jti


def get(gateway: RunningGateway, target: str = TARGET, headers: dict[str, str] | None = None) -> httpx.Response:
    with gateway.client() as client:
        return client.get(target, headers=headers or {})


def assert_refused(gateway: RunningGateway, status: int, headers: httpx.Headers | dict[str, str], body: Any,
                   reason: str | None = None) -> None:
    assert status == 401, body
    assert body["error"] == "unauthenticated", body
    assert headers.get("www-authenticate") == INVALID_TOKEN
    if reason is not None:
        assert mentions(body["message"], reason), body["message"]
    assert gateway.upstream.received == []


def assert_response_refused(gateway: RunningGateway, response: httpx.Response, reason: str | None = None) -> None:
    assert_refused(gateway, response.status_code, response.headers, response.json(), reason)


def assert_forwarded(gateway: RunningGateway, response: httpx.Response, token: str) -> None:
    assert response.status_code == 200, response.text
    assert len(gateway.upstream.received) == 1
    got = gateway.upstream.received[0]
    assert got.raw_path == TARGET.encode()
    assert got.header("authorization") == [f"Bearer {UPSTREAM_SECRET}"]
    assert token not in repr(got.headers)


def test_gateway_accepts_the_unforged_baseline(gw: RunningGateway) -> None:
    token, jti = baseline(gateway_forge(gw))
    assert jti is not None
    register(gw, jti)
    assert_forwarded(gw, get(gw, headers={"Authorization": f"Bearer {token}"}), token)


@pytest.mark.parametrize("case", FORGED, ids=FORGED_IDS)
def test_gateway_refuses_forged_token(case: Case, gw: RunningGateway) -> None:
    token, jti = case.build(gateway_forge(gw))
    if jti is not None:
        register(gw, jti)
    assert_response_refused(gw, get(gw, headers={"Authorization": f"Bearer {token}"}), case.reason)


RequestCase = Callable[[RunningGateway, str], httpx.Response]


REQUEST_CASES: list[tuple[str, RequestCase, str]] = [
    ("no Authorization header", lambda g, t: get(g), "no token"),
    ("prefix sgt_ missing", lambda g, t: get(g, headers={"Authorization": f"Bearer {t[len(PREFIX):]}"}), "sgt_"),
    ("scheme Basic with the token", lambda g, t: get(g, headers={"Authorization": f"Basic {t}"}), "Bearer"),
    ("scheme Basic with credentials",
     lambda g, t: get(g, headers={"Authorization": "Basic " + b64(b"user:" + t.encode())}), "Bearer"),
    ("token only in the query string", lambda g, t: get(g, f"{TARGET}?access_token={t}"), "query"),
    ("token in the query string even with a valid header",
     lambda g, t: get(g, f"{TARGET}?access_token={t}", {"Authorization": f"Bearer {t}"}), "query"),
    ("token under another query parameter with a valid header",
     lambda g, t: get(g, f"{TARGET}?t={t}", {"Authorization": f"Bearer {t}"}), "query"),
    ("two tokens in one header", lambda g, t: get(g, headers={"Authorization": f"Bearer {t} {t}"}), "more than one"),
]


@pytest.mark.parametrize(("name", "send", "reason"), REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_gateway_refuses_request(name: str, send: RequestCase, reason: str, gw: RunningGateway) -> None:
    token = gw.mint(GRANT, name="request-case")
    assert_response_refused(gw, send(gw, token), reason)


@pytest.mark.parametrize("second", ["same", "garbage"])
def test_gateway_refuses_two_authorization_headers(second: str, gw: RunningGateway) -> None:
    token = gw.mint(GRANT, name="two-headers")
    other = f"Bearer {token}" if second == "same" else "Bearer sgt_garbage"
    request = (f"GET {TARGET} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
               f"Authorization: {other}\r\nConnection: close\r\n\r\n").encode("ascii")
    status, headers, body = raw_request(gw.port, request)
    assert_refused(gw, status, headers, json.loads(body), "more than one")


def test_gateway_refuses_token_never_registered_in_its_store(gw: RunningGateway) -> None:
    issuer = TokenIssuer(gw.services.keyring, gw.config.tokens_issuer, gw.config.tokens_audience)
    token, _ = issuer.mint(sub="test:user", name="unregistered", grants=(parse_grant(GRANT),), ttl_s=600)
    assert_response_refused(gw, get(gw, headers={"Authorization": f"Bearer {token}"}), "not registered")


def test_gateway_refuses_token_longer_than_max_bytes_that_is_otherwise_valid(gw: RunningGateway) -> None:
    grants = [f"viewer@app:web-staging-{i:04d}" for i in range(300)]
    short = gw.mint(GRANT, *grants[:50], name="many-grants")
    assert len(short) < MAX_TOKEN_BYTES
    assert get(gw, headers={"Authorization": f"Bearer {short}"}).status_code == 200
    gw.upstream.clear()
    long = gw.mint(GRANT, *grants, name="too-many-grants")
    assert len(long) > MAX_TOKEN_BYTES
    assert_response_refused(gw, get(gw, headers={"Authorization": f"Bearer {long}"}), str(MAX_TOKEN_BYTES))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "FlyV1"])
def test_gateway_accepts_scheme(scheme: str, gateway: RunningGateway) -> None:
    token = gateway.mint(GRANT, name="scheme")
    assert_forwarded(gateway, get(gateway, headers={"Authorization": f"{scheme} {token}"}), token)


def test_gateway_refuses_revoked_token_within_one_second(gateway: RunningGateway) -> None:
    token = gateway.mint(GRANT, name="to-revoke")
    headers = {"Authorization": f"Bearer {token}"}
    # Used once first, so the running gateway holds the token as live in its caches.
    assert get(gateway, headers=headers).status_code == 200
    jti = jti_of(token)
    assert jti in gateway.revoke(jti)
    revoked_at = time.monotonic()
    while True:
        before = len(gateway.upstream.received)
        response = get(gateway, headers=headers)
        elapsed = time.monotonic() - revoked_at
        if response.status_code != 200 or elapsed > 2.0:
            break
        time.sleep(0.02)
    assert response.status_code == 401, f"still {response.status_code} {elapsed:.2f}s after revocation"
    assert response.json()["error"] == "unauthenticated"
    assert response.headers.get("www-authenticate") == INVALID_TOKEN
    assert "revoked" in response.json()["message"]
    assert len(gateway.upstream.received) == before  # the refused request reached nothing
    assert elapsed <= 1.0, f"revocation took {elapsed:.2f}s to reach the running gateway"


def test_key_ids_never_start_with_a_dash() -> None:
    """A kid is typed on command lines (`scopegate keys retire KID`): '-x...' would read as an option."""
    from gateway.core.keyring import new_key

    assert not any(new_key().kid.startswith("-") for _ in range(2000))  # ~1 in 64 would without the guard


def test_a_store_made_before_lineage_columns_opens_and_derives(tmp_path: Any) -> None:
    import sqlite3

    from gateway.store import TokenRecord
    from gateway.store.sqlite import SqliteStore

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE tokens (jti TEXT PRIMARY KEY, sub TEXT NOT NULL, name TEXT NOT NULL, grants TEXT NOT NULL,"
        " iat INTEGER NOT NULL, exp INTEGER NOT NULL, parent TEXT, revoked_at INTEGER, revoked_reason TEXT,"
        " last_used_at INTEGER);"
        "INSERT INTO tokens VALUES ('old-root-jti-0000000000', 'u', 'n', '[\"viewer@app:web\"]', 1, 4000000000,"
        " NULL, NULL, NULL, NULL);")
    old.commit()
    old.close()

    async def run() -> tuple[TokenRecord | None, str | None, str | None]:
        store = SqliteStore(path)
        try:
            before = await store.get("old-root-jti-0000000000")
            child = TokenRecord(jti="child-jti-000000000000", sub="u", name="c", grants=("viewer@app:web",), iat=2,
                                exp=3_000_000_000, parent="old-root-jti-0000000000", root="old-root-jti-0000000000")
            put = await store.put_derived(child, now=int(time.time()), max_live=1)
            again = await store.put_derived(replace(child, jti="child-jti-000000000001"), now=int(time.time()),
                                            max_live=1)
            return before, put, again
        finally:
            await store.close()

    before, put, again = asyncio.run(run())
    assert before is not None and before.root is None and before.rotated_from is None
    assert put is None and again == "full"


def test_two_processes_opening_an_older_store_at_once_both_open_it(tmp_path: Any) -> None:
    # A server's workers open the store together after an upgrade: both add the new columns; one
    # was refused ("duplicate column name", "database is locked") and a worker failed to start.
    import sqlite3
    import subprocess
    import sys

    from gateway.store.sqlite import _SCHEMA

    old_schema = _SCHEMA.replace("    rotated_from TEXT,\n    chain TEXT\n", "")
    old_schema = old_schema.replace("    last_used_at INTEGER,\n    root TEXT,\n", "    last_used_at INTEGER\n")
    opener = ("import sys, time; from pathlib import Path; from gateway.store.sqlite import SqliteStore; "
              "at = float(sys.argv[2]); time.sleep(max(0.0, at - time.time())); SqliteStore(Path(sys.argv[1]))")
    for attempt in range(4):
        path = tmp_path / f"old-{attempt}.db"
        db = sqlite3.connect(path)
        db.executescript(old_schema)
        db.close()
        assert "chain" not in old_schema and "root TEXT" not in old_schema
        at = str(time.time() + 1.0)
        procs = [subprocess.Popen([sys.executable, "-c", opener, str(path), at], stderr=subprocess.PIPE)
                 for _ in range(3)]
        errors = [proc.communicate(timeout=30)[1].decode() for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0, 0], errors


# --- unit: the compact JWS parts (gateway/core/jws.py) ------------------------------------------

def test_a_segment_is_read_only_in_its_one_canonical_spelling() -> None:
    from gateway.core.jws import segment, segment_json

    data = bytes(range(64))
    canonical = b64(data)  # 86 characters: the last carries 2 data bits and 4 zero bits
    assert segment(canonical) == data
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(canonical[-1])
    for other in (canonical + "==", canonical[:-1] + alphabet[last ^ 1], canonical[:-1] + alphabet[last ^ 8],
                  canonical.replace("-", "+").replace("_", "/"), canonical[:-1], "é" + canonical[1:]):
        if other != canonical:
            assert segment(other) is None, other
    assert segment_json(b64(b'{"a":1}')) == {"a": 1}
    for not_an_object in (b"[1]", b"1", b'"a"', b"{", '{"a":1}'.encode("utf-16"), b'{"a":1}\xff'):
        assert segment_json(b64(not_an_object)) is None
    with pytest.raises(Unauthenticated, match="twice"):
        segment_json(b64(b'{"a":1,"b":{"c":1,"c":2}}'))
