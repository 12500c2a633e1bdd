"""Scopegate tokens: Ed25519-signed JWTs presented as `sgt_<jwt>`.

Minting signs the DESIGN section 3 claims with the keyring's active key. Verification is
strict and never trusts the token to say how it should be checked: only `EdDSA`, only keys from
our own keyring (by `kid`), no `jku`/`jwk`/`x5u`/`x5c`/`crit`/`b64` headers, exact `iss` and `aud`,
and every claim required. Whether the token is still registered and not revoked is the store's
question (`registry.py`), asked after this one.

Verified tokens are cached by a SHA-256 digest of their exact bytes (bounded by memory,
least recently used out, expiry-aware) because a verification costs ~60-90 µs (~40 of them the
Ed25519 check, done with libsodium through PyNaCl: ~2x OpenSSL's, bench/ed25519.py) and every
request would pay it. The compact JWS is parsed here rather than by pyjwt (which added ~55 µs
per token around the signature check) and as strictly: one canonical base64url spelling per
segment, JSON objects without repeated names, the header checked before the key is chosen.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import nacl.exceptions
import nacl.signing

from gateway.core.grants import Grant, GrantError, parse_grant
from gateway.core.jws import segment, segment_json
from gateway.core.keyring import Keyring, SigningKey
from gateway.core.sized_cache import MIB, SLOT_BYTES, SizedLRU, str_bytes
from gateway.errors import Unauthenticated

PREFIX = "sgt_"
ALGORITHMS = ["EdDSA"]
REQUIRED_CLAIMS = ("iss", "aud", "sub", "jti", "iat", "nbf", "exp", "name", "grants")
_FORBIDDEN_HEADERS = ("jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64")
MAX_TOKEN_BYTES = 8192
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
LEEWAY_S = 5
# The verified-token cache's default budget (config `limits.token_cache_mb`): a token with a few
# grants holds ~580 bytes (tracemalloc; ~635 charged), so 100,000 in use take ~64 MB of it.
DEFAULT_CACHE_BYTES = 128 * MIB
_KEY_BYTES = 65  # a 32-byte bytes object (the SHA-256 digest)
_sha256 = hashlib.sha256
_CLAIMS_BYTES = 112  # a slotted Claims of 12 fields, with its garbage-collector header
_GRANT_BYTES = 64  # a slotted Grant of 3 fields, with its garbage-collector header


@dataclass(frozen=True, slots=True)
class Claims:
    iss: str
    aud: str
    sub: str
    jti: str
    iat: int
    nbf: int
    exp: int
    name: str
    grants: tuple[Grant, ...]
    parent: str | None = None
    root: str | None = None  # the first token of the derivation chain (None: this token is one)
    # The grants of every token this one was derived from, its parent's first: a request must be
    # allowed under each of them too, so a later policy change cannot widen a child beyond them.
    chain: tuple[tuple[Grant, ...], ...] = ()

    @property
    def lineage(self) -> str:
        """The jti of the token this one descends from by attenuation (itself if none): what its
        rate limit, derivation limit and cap on live children are counted against."""
        return self.root or self.jti

    def grant_strings(self) -> list[str]:
        return [str(g) for g in self.grants]


def new_jti() -> str:
    # 160 random bits, URL-safe: above the 128 DESIGN asks for. Never a leading '-', which a
    # command line would read as an option (`scopegate token show -abc...`).
    while True:
        jti = secrets.token_urlsafe(20)
        if not jti.startswith("-"):
            return jti


class TokenIssuer:
    def __init__(self, keyring: Keyring, issuer: str, audience: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.keyring = keyring
        self.issuer = issuer
        self.audience = audience
        self.clock = clock

    def mint(self, *, sub: str, name: str, grants: tuple[Grant, ...], ttl_s: int,
             parent: str | None = None, root: str | None = None,
             chain: tuple[tuple[Grant, ...], ...] = ()) -> tuple[str, Claims]:
        now = int(self.clock())
        claims = Claims(iss=self.issuer, aud=self.audience, sub=sub, jti=new_jti(), iat=now, nbf=now,
                        exp=now + ttl_s, name=name, grants=grants, parent=parent, root=root, chain=chain)
        payload: dict[str, Any] = {
            "iss": claims.iss, "aud": claims.aud, "sub": claims.sub, "jti": claims.jti, "iat": now,
            "nbf": now, "exp": claims.exp, "name": name, "grants": claims.grant_strings(),
        }
        if parent is not None:
            payload["parent"] = parent
        if root is not None:
            payload["root"] = root
        if chain:
            payload["chain"] = [[str(g) for g in level] for level in chain]
        key = self.keyring.active
        token = jwt.encode(payload, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})
        return PREFIX + token, claims


class TokenVerifier:
    """Verifies `sgt_` tokens, remembering verified claims by a SHA-256 digest of the exact token.

    The cache is bounded by bytes (`cache_bytes`, config `limits.token_cache_mb`), least recently
    used first out, so that every token in use fits whatever their number; entries past their
    `exp` are refused and dropped when met. A digest key needs the exact same token bytes (a
    second preimage of SHA-256) and costs 32 bytes instead of the token's ~450. In front of it, a
    small map by the exact `Authorization` value (up to 1 MiB of them, dropped whole when full)
    answers the tokens presented again and again without hashing them (~1 µs a request).
    """

    def __init__(self, keyring: Keyring, issuer: str, audience: str, *,
                 clock: Callable[[], float] = time.time, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.keyring = keyring
        self.issuer = issuer
        self.audience = audience
        self.clock = clock
        self.cache_bytes = cache_bytes
        self._recent_max = min(MIB, cache_bytes // 16)
        self._cache: SizedLRU[bytes, Claims] = SizedLRU(cache_bytes - cache_bytes // 8 - self._recent_max,
                                                        self._claims_bytes, key_bytes=_KEY_BYTES)
        # Parsed grants by their text, shared by every cached token that carries them (tokens
        # minted for one purpose carry the same few grants): up to 1/8 of the budget.
        self._grants: dict[str, Grant] = {}
        self._grants_bytes = 0
        # The same claims by the plain header value that presented them (`Bearer <token>` or
        # `FlyV1 <token>`, exactly), so that a token presented again skips the digest too.
        self._recent: dict[bytes, Claims] = {}
        self._recent_bytes = 0
        self._sodium_keys: dict[str, tuple[SigningKey, nacl.signing.VerifyKey]] = {}
        self.cache_hits = 0

    def cache_stats(self) -> dict[str, int]:
        return {"entries": len(self._cache), "bytes": self._cache.bytes + self._grants_bytes + self._recent_bytes,
                "max_bytes": self.cache_bytes, "evictions": self._cache.evictions}

    def clear_cache(self) -> None:
        self._cache.clear()
        self._grants_bytes = self._recent_bytes = 0
        self._grants = {}
        self._recent = {}
        self._sodium_keys = {}

    def verify_authorization(self, header_values: list[bytes]) -> Claims:
        """`verify(bearer_token(header_values))`; a plain `Bearer sgt_...` or `FlyV1 sgt_...` value
        whose token is cached is answered without parsing the header."""
        if len(header_values) != 1:
            return self.verify(bearer_token(header_values))  # refuses it
        value = header_values[0]
        cached = self._recent.get(value)
        if cached is not None:
            if cached.exp > self.clock() - LEEWAY_S:
                self.cache_hits += 1
                return cached
            del self._recent[value]  # expired: `verify` below says so
            self._recent_bytes -= sys.getsizeof(value) + SLOT_BYTES
        start = 7 if value.startswith(b"Bearer sgt_") else 6 if value.startswith(b"FlyV1 sgt_") else 0
        if start and len(value) - start <= MAX_TOKEN_BYTES:
            # A hit means the rest of the value is exactly a token verified before, which is what
            # bearer_token would return for it (a token holds no space, comma or non-ASCII byte).
            key = _sha256(value[start:]).digest()
            entries = self._cache.entries
            cached = entries.get(key)
            if cached is not None and cached.exp > self.clock() - LEEWAY_S:
                entries.move_to_end(key)  # SizedLRU.get, inline: many requests take this path
                self.cache_hits += 1
                self._remember_header(value, cached)
                return cached
        presented = bearer_token(header_values)
        claims = self.verify(presented)
        if start and len(value) - start == len(presented) and value.endswith(presented.encode("ascii")):
            self._remember_header(value, claims)  # only the plain spellings: a key is never much larger
        return claims

    def _remember_header(self, value: bytes, claims: Claims) -> None:
        cost = sys.getsizeof(value) + SLOT_BYTES
        if self._recent_bytes + cost > self._recent_max:
            self._recent = {}
            self._recent_bytes = 0
            if cost > self._recent_max:
                return
        self._recent[value] = claims
        self._recent_bytes += cost

    def verify(self, presented: str) -> Claims:
        now = self.clock()
        if len(presented) > MAX_TOKEN_BYTES or not presented.isascii():
            return self._verify_uncached(presented, now)  # refuses it: never cached
        key = _sha256(presented.encode("ascii")).digest()
        cached = self._cache.get(key)
        if cached is not None:
            if cached.exp <= now - LEEWAY_S:
                self._cache.pop(key)
                raise Unauthenticated(f"token '{cached.name}' has expired; ask for a new one")
            self.cache_hits += 1
            return cached
        claims = self._verify_uncached(presented, now)
        self._cache.put(key, claims)
        return claims

    def _verify_uncached(self, presented: str, now: float) -> Claims:
        if len(presented) > MAX_TOKEN_BYTES:
            raise Unauthenticated(f"token is longer than {MAX_TOKEN_BYTES} bytes; it is not a Scopegate token")
        if not presented.startswith(PREFIX):
            raise Unauthenticated("token must start with 'sgt_'; present the token exactly as it was minted")
        raw = presented[len(PREFIX):]
        if not _COMPACT_JWS.fullmatch(raw):
            # One spelling per token: no padding, no standard-base64 alphabet, no whitespace
            # (and `segment` below refuses non-zero padding bits: gateway/core/jws.py).
            raise Unauthenticated("token is malformed; present the token exactly as it was minted")
        header_b64, payload_b64, signature_b64 = raw.split(".")
        header = segment_json(header_b64)
        if header is None:
            raise Unauthenticated("token is malformed; present the token exactly as it was minted")
        if header.get("alg") not in ALGORITHMS:
            raise Unauthenticated("token uses an algorithm this gateway does not accept")
        if any(name in header for name in _FORBIDDEN_HEADERS):
            raise Unauthenticated("token header names keys or extensions this gateway never accepts")
        kid = header.get("kid")
        key = self.keyring.verifying_key(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("token was signed with a key this gateway does not know (retired or foreign)")
        signature = segment(signature_b64)
        if signature is None or len(signature) != 64 or not self._signature_holds(
                key, signature, raw[:len(header_b64) + 1 + len(payload_b64)].encode("ascii")):
            raise Unauthenticated("token signature or encoding is invalid")
        payload = segment_json(payload_b64)
        if payload is None:
            raise Unauthenticated("token signature or encoding is invalid")
        for name in REQUIRED_CLAIMS:
            if name not in payload:
                raise Unauthenticated(f"token lacks the required claim {name!r}")
        # Exact strings only: a list audience (RFC 7519 allows one) is refused too.
        if payload["aud"] != self.audience or not isinstance(payload["aud"], str):
            raise Unauthenticated("token was issued for another audience")
        if payload["iss"] != self.issuer or not isinstance(payload["iss"], str):
            raise Unauthenticated("token was issued by another issuer")
        return _claims_from_payload(payload, now, issuer=self.issuer, audience=self.audience,
                                    grant_of=self._grant)

    def _signature_holds(self, key: SigningKey, signature: bytes, message: bytes) -> bool:
        # libsodium (PyNaCl) rather than OpenSSL (cryptography): ~2x faster (bench/ed25519.py).
        known = self._sodium_keys.get(key.kid)
        if known is None or known[0] is not key:
            known = self._sodium_keys[key.kid] = (key, nacl.signing.VerifyKey(key.public_bytes()))
        try:
            known[1].verify(message, signature)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return False
        return True

    def _grant(self, text: str) -> Grant:
        grant = self._grants.get(text)
        if grant is None:
            grant = parse_grant(text)
            cost = grant_bytes(grant) + sys.getsizeof(text) + SLOT_BYTES
            if self._grants_bytes + cost <= self.cache_bytes // 8:  # beyond that: charged per token
                self._grants[text] = grant
                self._grants_bytes += cost
        return grant

    def _claims_bytes(self, claims: Claims) -> int:
        """What one cached Claims holds that no other entry shares (grants from the shared pool are
        charged once, to the pool)."""
        total = claims_bytes(claims)
        for grant in claims.grants:
            if self._grants.get(str(grant)) is not grant:
                total += grant_bytes(grant)
        return total


def claims_bytes(claims: Claims) -> int:
    """Bytes of a Claims object and the values it alone holds (its issuer and audience strings are
    the verifier's own; its grants are counted by the caller)."""
    total = _CLAIMS_BYTES + sum(str_bytes(text) for text in (claims.sub, claims.jti, claims.name, claims.parent,
                                                              claims.root))
    total += sys.getsizeof(claims.exp) + (0 if claims.nbf is claims.iat else sys.getsizeof(claims.nbf))
    total += sys.getsizeof(claims.iat) + sys.getsizeof(claims.grants)
    for level in claims.chain:
        total += sys.getsizeof(level) + sum(grant_bytes(grant) for grant in level)
    return total


def grant_bytes(grant: Grant) -> int:
    # The scope kind is one of three literal strings, shared by every grant.
    return _GRANT_BYTES + sys.getsizeof(grant.role) + sys.getsizeof(grant.pattern)


def _claims_from_payload(payload: dict[str, Any], now: float, *, issuer: str, audience: str,
                         grant_of: Callable[[str], Grant] = parse_grant) -> Claims:
    """The Claims of a verified payload whose `iss` and `aud` equal `issuer` and `audience` (the
    verifier's own strings are kept, one copy for every token)."""
    def text(name: str) -> str:
        value = payload[name]
        if not isinstance(value, str) or not value:
            raise Unauthenticated(f"token claim {name!r} must be a non-empty string")
        return value

    def number(name: str) -> int:
        value = payload[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise Unauthenticated(f"token claim {name!r} must be an integer time")
        return value

    if number("exp") <= now - LEEWAY_S:
        raise Unauthenticated("token has expired; ask for a new one")
    if number("nbf") > now + LEEWAY_S or number("iat") > now + LEEWAY_S:
        raise Unauthenticated("token is not valid yet (nbf or iat in the future)")
    grants_raw = payload["grants"]
    if not isinstance(grants_raw, list) or not grants_raw or not all(isinstance(g, str) for g in grants_raw):
        raise Unauthenticated("token claim 'grants' must be a non-empty list of grant strings")
    try:
        grants = tuple(grant_of(g) for g in grants_raw)
    except GrantError:
        raise Unauthenticated("token carries a grant this gateway cannot parse") from None
    parent, root = payload.get("parent"), payload.get("root")
    if parent is not None and not isinstance(parent, str):
        raise Unauthenticated("token claim 'parent' must be a string")
    if root is not None and (not isinstance(root, str) or parent is None):
        raise Unauthenticated("token claim 'root' must be a string, on a derived token only")
    chain = _chain(payload.get("chain"), parent)
    if len(text("jti")) < 22:
        raise Unauthenticated("token claim 'jti' is too short to be one of ours")
    if text("iss") != issuer or text("aud") != audience:
        raise Unauthenticated("token was issued by another issuer or for another audience")
    iat = number("iat")
    nbf = iat if number("nbf") == iat else number("nbf")  # one int object where they agree (most tokens)
    return Claims(iss=issuer, aud=audience, sub=text("sub"), jti=text("jti"), iat=iat, nbf=nbf, exp=number("exp"),
                  name=text("name"), grants=grants, parent=parent, root=root, chain=chain)


def _chain(value: Any, parent: str | None) -> tuple[tuple[Grant, ...], ...]:
    if value is None:
        return ()
    if (parent is None or not isinstance(value, list) or not value or not all(
            isinstance(level, list) and level and all(isinstance(g, str) for g in level) for level in value)):
        raise Unauthenticated("token claim 'chain' must be a non-empty list of grant lists, on a derived token only")
    try:
        return tuple(tuple(parse_grant(g) for g in level) for level in value)
    except GrantError:
        raise Unauthenticated("token carries a grant this gateway cannot parse") from None


def bearer_token(header_values: list[bytes]) -> str:
    """The token from the Authorization header(s): `Bearer sgt_...` or `FlyV1 sgt_...`."""
    if not header_values:
        raise Unauthenticated("no token; send 'Authorization: Bearer sgt_...'")
    if len(header_values) > 1:
        raise Unauthenticated("more than one Authorization header; send exactly one")
    try:
        value = header_values[0].decode("ascii")
    except UnicodeDecodeError:
        raise Unauthenticated("Authorization header is not ASCII") from None
    scheme, _, token = value.strip().partition(" ")
    # Schemes are case-insensitive (RFC 9110 section 11.1).
    if scheme.lower() not in ("bearer", "flyv1") or not token:
        raise Unauthenticated("Authorization must be 'Bearer sgt_...' or 'FlyV1 sgt_...'")
    token = token.strip()
    if " " in token or "," in token:
        raise Unauthenticated("Authorization carries more than one token; send exactly one sgt_ token")
    return token
