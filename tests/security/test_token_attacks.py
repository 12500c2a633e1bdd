"""Token attacks through a running gateway (DESIGN section 3): forged, confused, malleated, replayed.

Every forged token differs from a valid one in one respect and, where it has a jti, that jti is
registered in the gateway's store: "not registered" is never why a case is refused. Each refusal
is a 401 `unauthenticated` with `WWW-Authenticate: Bearer error="invalid_token"`, and the
upstream receives nothing. Accepted spellings (scheme case, RFC 9110) are forwarded exactly.

`tests/test_tokens.py` covers the verifier unit by unit; this file is the attacker's view of the
same boundary, plus re-encodings of real token strings and replays after revocation/rotation.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.core.grants import parse_grant
from gateway.core.keyring import Keyring, new_key
from gateway.core.tokens import PREFIX, TokenIssuer
from gateway.store import TokenRecord
from gateway.store.backends import open_store
from tests.conftest import RunningGateway
from tests.security.harness import (
    Answer,
    assert_forwarded_exactly,
    assert_refused,
    request,
    reset,
    running_gateway,
    send,
)

GRANT = "viewer@app:web-staging"
TARGET = b"/v1/apps/web-staging/machines"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-tokens")) as gateway:
        yield gateway


@pytest.fixture
def gw(shared: RunningGateway) -> RunningGateway:
    return reset(shared)


# --- forging ----------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class Forge:
    keyring: Keyring
    issuer: str
    audience: str

    def header(self, **changes: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": "EdDSA", "typ": "JWT", "kid": self.keyring.active.kid}
        header.update(changes)
        return header

    def payload(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": "test:attacker", "jti": secrets.token_urlsafe(20),
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

    def hmac(self, header: dict[str, Any], payload: dict[str, Any], secret: bytes, digest: str = "sha256") -> str:
        signing_input = f"{b64(compact(header))}.{b64(compact(payload))}"
        mac = hmac.new(secret, signing_input.encode("ascii"), getattr(hashlib, digest)).digest()
        return f"{PREFIX}{signing_input}.{b64(mac)}"

    def unsigned(self, header: dict[str, Any], payload: dict[str, Any], signature: str = "") -> str:
        return f"{PREFIX}{b64(compact(header))}.{b64(compact(payload))}.{signature}"


Build = Callable[[Forge], str]
NOW = int(time.time())


def signed(header: dict[str, Any] | None = None, **claims: Any) -> Build:
    return lambda f: f.sign(f.header(**(header or {})), f.payload(**claims))


def without(claim: str) -> Build:
    def build(f: Forge) -> str:
        payload = f.payload()
        del payload[claim]
        return f.sign(f.header(), payload)
    return build


def duplicated(claim: str, value: Any, spelled: str | None = None) -> Build:
    def build(f: Forge) -> str:
        body = compact(f.payload())[:-1] + b',"' + (spelled or claim).encode() + b'":' + compact(value) + b"}"
        return f.sign(f.header(), body)
    return build


def nested_header(f: Forge) -> str:
    """A header 2,500 arrays deep, within the 8 KiB (json.loads raises RecursionError): refused, not a 500."""
    header = compact(f.header())[:-1] + b',"x":' + b"[" * 2500 + b"]" * 2500 + b"}"
    signing_input = f"{b64(header)}.{b64(compact(f.payload()))}"
    return f"{PREFIX}{signing_input}.{b64(f.keyring.active.private_key.sign(signing_input.encode('ascii')))}"


def pem(f: Forge) -> bytes:
    return f.keyring.active.public_key.public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)


def attacker_jwk(f: Forge) -> str:
    attacker = new_key()
    return f.sign(f.header(jwk=attacker.jwk(), kid=attacker.kid), f.payload(), key=attacker.private_key)


@dataclass(frozen=True)
class Forged:
    name: str
    build: Build
    reason: str  # a fragment of the 401 message ("a|b": either): refused for its own reason


FORGED = [
    # algorithm confusion
    Forged("alg none, empty signature", lambda f: f.unsigned(f.header(alg="none"), f.payload()), "algorithm"),
    Forged("alg None capitalised", lambda f: f.unsigned(f.header(alg="None"), f.payload()), "algorithm"),
    Forged("alg none with a real signature kept",
           lambda f: f.unsigned(f.header(alg="none"), f.payload(), f.sign(f.header(), f.payload()).rsplit(".")[-1]),
           "algorithm"),
    Forged("alg missing", lambda f: f.sign({"typ": "JWT", "kid": f.keyring.active.kid}, f.payload()), "algorithm"),
    Forged("HS256 keyed with the raw public key",
           lambda f: f.hmac(f.header(alg="HS256"), f.payload(), f.keyring.active.public_bytes()), "algorithm"),
    Forged("HS256 keyed with the PEM public key", lambda f: f.hmac(f.header(alg="HS256"), f.payload(), pem(f)),
           "algorithm"),
    Forged("HS256 keyed with the JWKS x value",
           lambda f: f.hmac(f.header(alg="HS256"), f.payload(), f.keyring.active.jwk()["x"].encode()), "algorithm"),
    Forged("HS512 keyed with the raw public key",
           lambda f: f.hmac(f.header(alg="HS512"), f.payload(), f.keyring.active.public_bytes(), "sha512"),
           "algorithm"),
    Forged("ES256 named over an Ed25519 signature", signed({"alg": "ES256"}), "algorithm"),
    Forged("alg Ed25519 (fully-specified name, not allow-listed)", signed({"alg": "Ed25519"}), "algorithm"),
    # key selection
    Forged("kid path traversal", signed({"kid": "../../../../etc/passwd"}), "key"),
    Forged("kid pointing at the keyring file", signed({"kid": "keyring.json"}), "key"),
    Forged("kid SQL injection", signed({"kid": "x' OR '1'='1"}), "key"),
    Forged("kid empty", signed({"kid": ""}), "key"),
    Forged("kid null", signed({"kid": None}), "key|malformed"),
    Forged("kid with a trailing newline", lambda f: f.sign(f.header(kid=f.keyring.active.kid + "\n"), f.payload()),
           "key"),
    Forged("kid with its case swapped", lambda f: f.sign(f.header(kid=f.keyring.active.kid.swapcase()), f.payload()),
           "key"),
    Forged("foreign key under our kid",
           lambda f: f.sign(f.header(), f.payload(), key=Ed25519PrivateKey.generate()), "signature"),
    Forged("jku pointing at the attacker", signed({"jku": "https://attacker.invalid/jwks.json"}), "header"),
    Forged("x5u pointing at the attacker", signed({"x5u": "https://attacker.invalid/cert.pem"}), "header"),
    Forged("jwk header carrying the attacker's key", attacker_jwk, "header"),
    Forged("jwk header carrying our own key", lambda f: f.sign(f.header(jwk=f.keyring.active.jwk()), f.payload()),
           "header"),
    Forged("x5t#S256 header", signed({"x5t#S256": "AAAA"}), "header"),
    Forged("crit naming exp", signed({"crit": ["exp"]}), "header|malformed"),
    Forged("crit empty list", signed({"crit": []}), "header|malformed"),
    Forged("b64 false (unencoded payload) with crit", signed({"b64": False, "crit": ["b64"]}), "header|malformed"),
    Forged("header nested 2,500 deep", nested_header, "malformed"),
    # time
    Forged("expired just past the leeway", signed(iat=NOW - 600, nbf=NOW - 600, exp=NOW - 6), "expired"),
    Forged("expired long ago", signed(iat=NOW - 90 * 86400, nbf=NOW - 90 * 86400, exp=NOW - 86400), "expired"),
    Forged("nbf in the future", signed(nbf=NOW + 300, exp=NOW + 900), "not valid yet"),
    Forged("iat in the future", signed(iat=NOW + 300, exp=NOW + 900), "not valid yet"),
    Forged("exp as a float", signed(exp=NOW + 600.5), "integer"),
    Forged("exp as a string", signed(exp=str(NOW + 600)), "token"),
    Forged("exp as true", signed(exp=True), "integer|token"),
    # issuer and audience
    Forged("wrong issuer", signed(iss="https://attacker.invalid"), "issuer"),
    Forged("wrong audience", signed(aud="api.machines.dev"), "audience"),
    Forged("audience list with ours and another", lambda f: signed(aud=[f.audience, "other"])(f), "audience"),
    Forged("audience with a trailing space", lambda f: signed(aud=f.audience + " ")(f), "audience"),
    # claims
    Forged("missing exp", without("exp"), "'exp'"),
    Forged("missing jti", without("jti"), "'jti'"),
    Forged("missing grants", without("grants"), "'grants'"),
    Forged("missing iss", without("iss"), "'iss'"),
    Forged("empty sub", signed(sub=""), "'sub'"),
    Forged("jti not a string", signed(jti=12345678901234567890123), "'jti'|string|invalid"),
    Forged("grants duplicated (escalation to admin)", duplicated("grants", ["admin@app:*"]), "twice"),
    Forged("exp duplicated (ten more years)", duplicated("exp", NOW + 10 * 365 * 86400), "twice"),
    Forged("aud duplicated via a JSON escape", lambda f: duplicated("aud", f.audience, "a\\u0075d")(f), "twice"),
]


def register(gateway: RunningGateway, token: str) -> None:
    """Give the forged token's jti a live record, as minting would (only the forgery may be refused)."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    except ValueError:
        return
    jti = payload.get("jti") if isinstance(payload, dict) else None
    if not isinstance(jti, str):
        return

    async def run() -> None:
        store = open_store(gateway.config)
        try:
            now = int(time.time())
            await store.put(TokenRecord(jti=jti, sub="test:attacker", name="forged", grants=(GRANT,), iat=now,
                                        exp=now + 600))
        finally:
            await store.close()

    asyncio.run(run())


def forge_for(gateway: RunningGateway) -> Forge:
    return Forge(gateway.services.keyring, gateway.config.tokens_issuer, gateway.config.tokens_audience)


def get(gateway: RunningGateway, token: str | None = None, *, scheme: str = "Bearer", target: bytes = TARGET,
        headers: list[tuple[bytes, bytes]] | None = None) -> Answer:
    return send(gateway, request("GET", target, token=token, scheme=scheme, headers=headers or []))


def mentions(answer: Answer, reason: str) -> bool:
    message = str(answer.json().get("message", "")).lower()
    return any(part.lower() in message for part in reason.split("|"))


def test_unforged_baseline_is_forwarded_exactly(gw: RunningGateway) -> None:
    token = forge_for(gw).sign(forge_for(gw).header(), forge_for(gw).payload())
    register(gw, token)
    answer = get(gw, token)
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])


@pytest.mark.parametrize("case", FORGED, ids=[c.name for c in FORGED])
def test_forged_token_is_refused(case: Forged, gw: RunningGateway) -> None:
    token = case.build(forge_for(gw))
    register(gw, token)
    answer = get(gw, token)
    assert_refused(gw, answer, 401, "unauthenticated")
    assert mentions(answer, case.reason), answer.body
    assert token.encode() not in answer.body


# --- re-encoded and malleated token strings ----------------------------------------------------

STANDARD_ALPHABET = str.maketrans("-_", "+/")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def with_signature(token: str, change: Callable[[str], str]) -> str:
    head, _, signature = token.rpartition(".")
    return f"{head}.{change(signature)}"


def flip_padding_bits(signature: str) -> str:
    # 64 bytes take 86 characters: the last one carries 4 data bits and 2 zero padding bits.
    last = ALPHABET.index(signature[-1])
    return signature[:-1] + ALPHABET[last ^ 0b01]


def flip_middle(signature: str) -> str:
    i = len(signature) // 2
    return signature[:i] + ALPHABET[ALPHABET.index(signature[i]) ^ 0b100000] + signature[i + 1:]


ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493


def scalar_plus_order(signature: str) -> str:
    """The same signature with S + L for S: valid for a verifier that reduces S instead of refusing
    a non-canonical one (the classic Ed25519 malleability; RFC 8032 requires 0 <= S < L)."""
    raw = base64.urlsafe_b64decode(signature + "==")
    s = int.from_bytes(raw[32:], "little") + ED25519_ORDER
    return b64(raw[:32] + s.to_bytes(32, "little"))


def r_sign_flipped(signature: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[31] ^= 0x80
    return b64(bytes(raw))


def segment(token: str, index: int, change: Callable[[str], str]) -> str:
    parts = token[len(PREFIX):].split(".")
    parts[index] = change(parts[index])
    return PREFIX + ".".join(parts)


def pad(text: str) -> str:
    return text + "=" * (-len(text) % 4)


MALLEATED: list[tuple[str, Callable[[str], str]]] = [
    ("signature with base64 padding added", lambda t: with_signature(t, pad)),
    ("signature with one '=' appended", lambda t: with_signature(t, lambda s: s + "=")),
    ("signature in the standard base64 alphabet",
     lambda t: with_signature(t, lambda s: s.translate(STANDARD_ALPHABET))),
    ("signature padding bits flipped", lambda t: with_signature(t, flip_padding_bits)),
    ("signature bit flipped in the middle", lambda t: with_signature(t, flip_middle)),
    ("signature's S plus the group order (non-canonical)", lambda t: with_signature(t, scalar_plus_order)),
    ("signature's R with its sign bit flipped", lambda t: with_signature(t, r_sign_flipped)),
    ("signature with a zero byte appended", lambda t: with_signature(
        t, lambda s: b64(base64.urlsafe_b64decode(s + "==") + b"\0"))),
    ("signature truncated by one character", lambda t: with_signature(t, lambda s: s[:-1])),
    ("signature with a character appended", lambda t: with_signature(t, lambda s: s + "A")),
    ("payload re-encoded with padding", lambda t: segment(t, 1, pad)),
    ("payload in the standard base64 alphabet", lambda t: segment(t, 1, lambda s: s.translate(STANDARD_ALPHABET))),
    ("header with '==' appended", lambda t: segment(t, 0, lambda s: s + "==")),
    ("a fourth segment appended", lambda t: t + ".e30"),
    ("a trailing dot", lambda t: t + "."),
    ("a space inside the signature", lambda t: with_signature(t, lambda s: s[:20] + " " + s[20:])),
    ("a space inside the payload", lambda t: segment(t, 1, lambda s: s[:10] + " " + s[10:])),
    ("prefix missing", lambda t: t[len(PREFIX):]),
    ("prefix upper-cased", lambda t: "SGT_" + t[len(PREFIX):]),
    ("prefix doubled", lambda t: PREFIX + t),
]


@pytest.fixture(scope="module")
def malleable(shared: RunningGateway) -> str:
    """A minted token whose re-encodings all differ from it: signature and payload use '-' or '_', and
    the payload's length is not a multiple of 4 (so that padding adds something)."""
    for i in range(60):
        # '~' (0x7E) is six 1-bits in a row somewhere: it makes base64's '-' or '_' likely.
        token = shared.mint(GRANT, name="malleable" + "x" * (i % 3) + "~~~?" * (i % 4 + 1))
        parts = token[len(PREFIX):].split(".")
        if (any(c in parts[2] for c in "-_") and any(c in parts[1] for c in "-_")
                and len(parts[1]) % 4):
            return token
    raise AssertionError("no minted token used both url-safe characters")


@pytest.mark.parametrize(("name", "change"), MALLEATED, ids=[name for name, _ in MALLEATED])
def test_re_encoded_token_string_is_refused(name: str, change: Callable[[str], str], malleable: str,
                                            gw: RunningGateway) -> None:
    assert get(gw, malleable).status == 200  # the token itself is good
    gw.upstream.clear()
    variant = change(malleable)
    assert variant != malleable
    assert_refused(gw, get(gw, variant), 401, "unauthenticated")


# --- how the token is presented ----------------------------------------------------------------

@pytest.fixture(scope="module")
def token(shared: RunningGateway) -> str:
    return shared.mint(GRANT, name="presented")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR", "FlyV1", "flyv1"])
def test_scheme_is_case_insensitive_and_forwarded_exactly(scheme: str, token: str, gw: RunningGateway) -> None:
    """RFC 9110 section 11.1: auth schemes are case-insensitive, so the gateway accepts any spelling."""
    answer = get(gw, token, scheme=scheme)
    assert answer.status == 200, answer.body
    assert_forwarded_exactly(gw, method="GET", raw_path=TARGET, client_tokens=[token])


PRESENTED: list[tuple[str, Callable[[str], bytes]]] = [
    ("token only in the query string", lambda t: request("GET", TARGET + b"?token=" + t.encode())),
    ("token in the query string beside a valid header",
     lambda t: request("GET", TARGET + b"?access_token=" + t.encode(), token=t)),
    ("access_token in the query with garbage beside a valid header",
     lambda t: request("GET", TARGET + b"?access_token=x", token=t)),
    ("token in the query with the prefix percent-encoded",
     lambda t: request("GET", TARGET + b"?t=sgt%5F" + t[len(PREFIX):].encode(), token=t)),
    ("access_token key percent-encoded", lambda t: request("GET", TARGET + b"?access%5Ftoken=" + t.encode())),
    ("two Authorization headers, both valid",
     lambda t: request("GET", TARGET, token=t, headers=[(b"Authorization", b"Bearer " + t.encode())])),
    ("two Authorization headers, names in other cases",
     lambda t: request("GET", TARGET, headers=[(b"AUTHORIZATION", b"Bearer " + t.encode()),
                                               (b"authorization", b"FlyV1 " + t.encode())])),
    ("a valid Authorization and an empty one", lambda t: request("GET", TARGET, token=t,
                                                                  headers=[(b"Authorization", b"")])),
    ("two credentials in one header, comma-separated",
     lambda t: request("GET", TARGET, headers=[(b"Authorization", f"Bearer {t}, Bearer {t}".encode())])),
    ("Basic scheme carrying the token", lambda t: request("GET", TARGET, token=t, scheme="Basic")),
    ("Token scheme", lambda t: request("GET", TARGET, token=t, scheme="Token")),
    ("no scheme at all", lambda t: request("GET", TARGET, headers=[(b"Authorization", t.encode())])),
    ("tab between scheme and token", lambda t: request("GET", TARGET, headers=[(b"Authorization",
                                                                                 b"Bearer\t" + t.encode())])),
    ("token only in Proxy-Authorization", lambda t: request("GET", TARGET, headers=[(b"Proxy-Authorization",
                                                                                      b"Bearer " + t.encode())])),
    ("token only in a cookie", lambda t: request("GET", TARGET, headers=[(b"Cookie", b"token=" + t.encode())])),
    ("token only in X-Api-Key", lambda t: request("GET", TARGET, headers=[(b"X-Api-Key", t.encode())])),
    ("non-ASCII byte in the Authorization header",
     lambda t: request("GET", TARGET, headers=[(b"Authorization", b"Bearer " + t.encode() + b"\xe9")])),
    # Past MAX_TOKEN_BYTES (8 KiB) but under the server's 64 KiB header limit (over it: 431).
    ("a 20 KB garbage token", lambda t: request("GET", TARGET, token="sgt_" + "A" * 20_000)),
]


@pytest.mark.parametrize(("name", "build"), PRESENTED, ids=[name for name, _ in PRESENTED])
def test_token_presented_the_wrong_way_is_refused(name: str, build: Callable[[str], bytes], token: str,
                                                  gw: RunningGateway) -> None:
    answer = send(gw, build(token))
    assert_refused(gw, answer, 401, "unauthenticated")
    assert token.encode() not in answer.body


def test_token_of_another_gateway_with_the_same_issuer_and_audience_is_refused(gw: RunningGateway) -> None:
    other, _ = TokenIssuer(Keyring.generate(), gw.config.tokens_issuer, gw.config.tokens_audience).mint(
        sub="test:attacker", name="elsewhere", grants=(parse_grant(GRANT),), ttl_s=600)
    register(gw, other)
    assert_refused(gw, get(gw, other), 401, "unauthenticated")


# --- replay after revocation and rotation -------------------------------------------------------

def jti_of(token: str) -> str:
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    jti = payload["jti"]
    assert isinstance(jti, str)
    return jti


@pytest.fixture(scope="module")
def admin_token(shared: RunningGateway) -> str:
    return shared.mint("token-admin@gateway", name="sec-admin")


def admin(gateway: RunningGateway, admin_token: str, method: str, path: str, token: str | None = None,
          body: dict[str, Any] | None = None) -> httpx.Response:
    with gateway.client() as client:
        return client.request(method, path, json=body, headers={"Authorization": f"Bearer {token or admin_token}"})


def revoke_directly(gateway: RunningGateway, admin_token: str, victim: str) -> str:
    response = admin(gateway, admin_token, "DELETE", f"/_gateway/v1/tokens/{jti_of(victim)}")
    assert response.status_code == 204, response.text
    return victim


def revoke_parent_of_child(gateway: RunningGateway, admin_token: str, parent: str) -> str:
    child = admin(gateway, admin_token, "POST", "/_gateway/v1/token/attenuate", token=parent,
                  body={"grants": [GRANT], "ttl": "10m"})
    assert child.status_code == 201, child.text
    child_token = child.json()["token"]
    assert isinstance(child_token, str)
    assert get(gateway, child_token).status == 200
    revoke_directly(gateway, admin_token, parent)
    return child_token


def rotate_without_grace(gateway: RunningGateway, admin_token: str, old: str) -> str:
    rotated = admin(gateway, admin_token, "POST", f"/_gateway/v1/tokens/{jti_of(old)}/rotate", body={"grace": "0s"})
    assert rotated.status_code == 201, rotated.text
    return old


REPLAYS: list[tuple[str, Callable[[RunningGateway, str, str], str]]] = [
    ("revoked token replayed", revoke_directly),
    ("child of a revoked parent replayed", revoke_parent_of_child),
    ("rotated-away token replayed after a zero grace", rotate_without_grace),
]


@pytest.mark.parametrize(("name", "make_dead"), REPLAYS, ids=[name for name, _ in REPLAYS])
def test_dead_token_replayed_is_refused(name: str, make_dead: Callable[[RunningGateway, str, str], str],
                                        admin_token: str, gw: RunningGateway) -> None:
    victim = gw.mint(GRANT, name=f"replay-{secrets.token_hex(3)}")
    assert get(gw, victim).status == 200  # used once: the running gateway holds it as live in its caches
    dead = make_dead(gw, admin_token, victim)
    gw.upstream.clear()
    time.sleep(0.01)
    assert_refused(gw, get(gw, dead), 401, "unauthenticated")
