"""Scopegate tokens: Ed25519-signed JWTs presented as `sgt_<jwt>`.

Minting signs the DESIGN section 3 claims with the keyring's active key. Verification is
strict and never trusts the token to say how it should be checked: only `EdDSA`, only keys from
our own keyring (by `kid`), no `jku`/`jwk`/`x5u`/`x5c`/`crit` headers, exact `iss` and `aud`,
and every claim required. Whether the token is still registered and not revoked is the store's
question (`registry.py`), asked after this one.

Verified tokens are cached by their string (bounded, expiry-aware) because an Ed25519 verify
costs ~0.2 ms and every request would pay it.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.core.grants import Grant, GrantError, parse_grant
from gateway.core.keyring import Keyring
from gateway.errors import Unauthenticated

PREFIX = "sgt_"
ALGORITHMS = ["EdDSA"]
REQUIRED_CLAIMS = ("iss", "aud", "sub", "jti", "iat", "nbf", "exp", "name", "grants")
_FORBIDDEN_HEADERS = ("jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit")
MAX_TOKEN_BYTES = 8192
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
LEEWAY_S = 5


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
    def __init__(self, keyring: Keyring, issuer: str, audience: str, *,
                 clock: Callable[[], float] = time.time, cache_size: int = 10_000) -> None:
        self.keyring = keyring
        self.issuer = issuer
        self.audience = audience
        self.clock = clock
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        # The same claims by the raw Authorization header value that presented them, so that a
        # repeated header skips parsing too (bounded alike, dropped whole when full).
        self._by_header: dict[bytes, Claims] = {}
        self.cache_hits = 0

    def clear_cache(self) -> None:
        self._cache.clear()
        self._by_header = {}

    def verify_authorization(self, header_values: list[bytes]) -> Claims:
        """`verify(bearer_token(header_values))`, remembered by the header value."""
        if len(header_values) == 1:
            cached = self._by_header.get(header_values[0])
            if cached is not None:
                if cached.exp > self.clock() - LEEWAY_S:
                    self.cache_hits += 1
                    return cached
                del self._by_header[header_values[0]]  # expired: `verify` below says so
        presented = bearer_token(header_values)
        claims = self.verify(presented)
        # Only the plain spellings are remembered, so a key is never much larger than a token
        # (bearer_token accepts extra spaces and any case of the scheme; those are just parsed).
        value = header_values[0]  # one value: bearer_token refuses more
        encoded = presented.encode("ascii")
        if value == b"Bearer " + encoded or value == b"FlyV1 " + encoded:
            if len(self._by_header) >= self.cache_size:
                self._by_header = {}
            self._by_header[value] = claims
        return claims

    def verify(self, presented: str) -> Claims:
        now = self.clock()
        cached = self._cache.get(presented)
        if cached is not None:
            if cached.exp <= now - LEEWAY_S:
                del self._cache[presented]
                raise Unauthenticated(f"token '{cached.name}' has expired; ask for a new one")
            self.cache_hits += 1
            return cached
        claims = self._verify_uncached(presented, now)
        self._cache[presented] = claims
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return claims

    def _verify_uncached(self, presented: str, now: float) -> Claims:
        if len(presented) > MAX_TOKEN_BYTES:
            raise Unauthenticated(f"token is longer than {MAX_TOKEN_BYTES} bytes; it is not a Scopegate token")
        if not presented.startswith(PREFIX):
            raise Unauthenticated("token must start with 'sgt_'; present the token exactly as it was minted")
        raw = presented[len(PREFIX):]
        if not _COMPACT_JWS.fullmatch(raw):
            # One spelling per token: no padding, no standard-base64 alphabet, no whitespace.
            raise Unauthenticated("token is malformed; present the token exactly as it was minted")
        try:
            header = jwt.get_unverified_header(raw)
        except jwt.InvalidTokenError:
            raise Unauthenticated("token is malformed; present the token exactly as it was minted") from None
        if header.get("alg") not in ALGORITHMS:
            raise Unauthenticated("token uses an algorithm this gateway does not accept")
        if any(name in header for name in _FORBIDDEN_HEADERS):
            raise Unauthenticated("token header names keys or extensions this gateway never accepts")
        kid = header.get("kid")
        key = self.keyring.verifying_key(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("token was signed with a key this gateway does not know (retired or foreign)")
        try:
            # Times are checked below against this verifier's clock, not pyjwt's.
            payload = jwt.decode(
                raw, key.public_key, algorithms=ALGORITHMS, audience=self.audience, issuer=self.issuer,
                options={"require": list(REQUIRED_CLAIMS), "strict_aud": True, "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token was issued for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token was issued by another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the required claim {exc.claim!r}") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("token signature or encoding is invalid") from None
        _reject_duplicate_claims(raw)
        return _claims_from_payload(payload, now)


def _reject_duplicate_claims(raw: str) -> None:
    # json.loads keeps the last of two equal keys; another parser may keep the first. A token
    # whose meaning depends on the parser is refused.
    body = raw.split(".")[1]
    decoded = jwt.utils.base64url_decode(body.encode("ascii"))

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise Unauthenticated("token has a claim twice; it was not minted by this gateway")
        return dict(pairs)

    json.loads(decoded, object_pairs_hook=no_duplicates)


def _claims_from_payload(payload: dict[str, Any], now: float) -> Claims:
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
        grants = tuple(parse_grant(g) for g in grants_raw)
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
    return Claims(iss=text("iss"), aud=text("aud"), sub=text("sub"), jti=text("jti"), iat=number("iat"),
                  nbf=number("nbf"), exp=number("exp"), name=text("name"), grants=grants, parent=parent,
                  root=root, chain=chain)


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
