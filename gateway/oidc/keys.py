"""The signing keys of the trusted OIDC issuers: JWKS discovery, fetching, caching and parsing.

This is the only part of the OIDC support that goes online, kept apart from the trust rules
(gateway/oidc_rules.py) so that loading the config or checking a token offline never imports an
HTTP client. Its refusals are the exchange's (`invalid_grant`, or 503 `temporarily_unavailable`
when an issuer's keys cannot be fetched), since a key lookup only ever happens inside an exchange.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.oidc.discovery import get_well_known_url
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from gateway.oidc.errors import REFETCH_INTERVAL_S, invalid_grant, unavailable
from gateway.oidc.rules import ALGORITHMS, fetchable_url

JWKS_TTL_S = 600              # a fetched JWKS (and discovery document) is used this long
CONNECT_TIMEOUT_S = 3.0
FETCH_TIMEOUT_S = 5.0
MAX_DOCUMENT_BYTES = 256 * 1024
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class IssuerKey:
    kid: str
    key: RSAKey | ECKey
    alg: str | None  # the JWK's own "alg", when it names one


@dataclass
class _IssuerEntry:
    keys: dict[str, IssuerKey] = field(default_factory=dict)
    fetched_at: float | None = None    # monotonic time of the last successful fetch
    attempted_at: float | None = None  # ... of the last attempt, successful or not
    last_error: str | None = None
    fetches: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class FetchError(Exception):
    pass


class IssuerKeys:
    """Each trusted issuer's JWKS, fetched over HTTP(S) and cached per issuer.

    Keys are looked up only in the entry of the token's issuer, so a kid published by one issuer
    never verifies a token that names another.
    """

    def __init__(self, jwks_urls: Mapping[str, str | None], *, monotonic: Callable[[], float] = time.monotonic,
                 ttl_s: float = JWKS_TTL_S, refetch_interval_s: float = REFETCH_INTERVAL_S) -> None:
        self.jwks_urls = dict(jwks_urls)  # issuer -> configured jwks_url (None: discover)
        self.monotonic = monotonic
        self.ttl_s = ttl_s
        self.refetch_interval_s = refetch_interval_s
        self.http: httpx.AsyncClient | None = None
        self._entries: dict[str, _IssuerEntry] = {}

    async def start(self) -> None:
        if self.http is None and self.jwks_urls:
            self.http = httpx.AsyncClient(
                timeout=httpx.Timeout(FETCH_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), follow_redirects=False,
                headers={"accept": "application/json", "user-agent": "scopegate-oidc"}, trust_env=False)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    def fetches(self, issuer: str) -> int:
        entry = self._entries.get(issuer)
        return entry.fetches if entry else 0

    async def key(self, issuer: str, kid: str) -> IssuerKey:
        """The key `kid` of `issuer`'s JWKS; raises ExchangeError (invalid_grant, or 503 when the
        keys cannot be fetched)."""
        if issuer not in self.jwks_urls:
            raise invalid_grant(f"issuer {issuer!r} is not trusted by this gateway")
        entry = self._entries.setdefault(issuer, _IssuerEntry())
        async with entry.lock:
            now = self.monotonic()
            if entry.fetched_at is None or now - entry.fetched_at >= self.ttl_s:
                await self._refresh(issuer, entry, now)
            found = entry.keys.get(kid)
            if found is None:
                since = now - (entry.attempted_at or 0.0)
                if since >= self.refetch_interval_s:
                    await self._refresh(issuer, entry, now)  # the issuer may have rotated its keys
                    found = entry.keys.get(kid)
                    since = 0.0
                if found is None:
                    wait = max(1, math.ceil(self.refetch_interval_s - since))
                    raise invalid_grant(
                        f"the token's key id {kid!r} is not in the JWKS of issuer {issuer} (keys fetched "
                        f"{int(since)}s ago; refetched at most every {int(self.refetch_interval_s)}s: "
                        f"retry in {wait}s if the issuer has just rotated its keys)")
            return found

    async def _refresh(self, issuer: str, entry: _IssuerEntry, now: float) -> None:
        if entry.last_error is not None and entry.attempted_at is not None \
                and now - entry.attempted_at < self.refetch_interval_s:
            wait = math.ceil(self.refetch_interval_s - (now - entry.attempted_at))
            raise unavailable(f"the signing keys of issuer {issuer} could not be fetched ({entry.last_error}); "
                              f"nothing was minted; retry in {wait}s", wait)
        entry.attempted_at = now
        entry.fetches += 1
        try:
            url = self.jwks_urls[issuer] or await self._discover(issuer)
            entry.keys = parse_jwks(await self._get_json(url, "JWKS"))
        except FetchError as exc:
            entry.last_error = str(exc)
            raise unavailable(f"the signing keys of issuer {issuer} could not be fetched ({exc}); nothing was "
                              f"minted; retry in {int(self.refetch_interval_s)}s",
                              int(self.refetch_interval_s)) from None
        entry.fetched_at, entry.last_error = now, None

    async def _discover(self, issuer: str) -> str:
        url = get_well_known_url(issuer, external=True)
        document = await self._get_json(url, "discovery document")
        if document.get("issuer") != issuer:
            raise FetchError(f"the discovery document at {url} names issuer {document.get('issuer')!r}, "
                             f"not {issuer!r}")
        jwks_uri = document.get("jwks_uri")
        try:
            jwks_uri = fetchable_url(jwks_uri)
        except ValueError as exc:
            raise FetchError(f"the discovery document at {url} has no usable jwks_uri: {exc}") from None
        if urlsplit(issuer).scheme == "https" and urlsplit(jwks_uri).scheme != "https":
            raise FetchError(f"the discovery document at {url} names a jwks_uri that is not https")
        return jwks_uri

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        if self.http is None:
            raise FetchError("the gateway's HTTP client is not started")
        try:
            async with self.http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise FetchError(f"the {what} at {url} answered HTTP {response.status_code}")
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise FetchError(f"the {what} at {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        except httpx.TimeoutException:
            raise FetchError(f"the {what} at {url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"the {what} at {url} is unreachable ({exc.__class__.__name__})") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise FetchError(f"the {what} at {url} is not JSON") from None
        if not isinstance(document, dict):
            raise FetchError(f"the {what} at {url} is not a JSON object")
        return document


def parse_jwks(document: Mapping[str, Any]) -> dict[str, IssuerKey]:
    """Signing keys by kid: RSA (>= 2048 bits) and EC P-256 public keys. Keys without a kid, for
    encryption, of other types or sizes are skipped; a kid that appears twice is dropped (ambiguous)."""
    items = document.get("keys")
    if not isinstance(items, list):
        raise FetchError("the JWKS has no 'keys' list")
    keys: dict[str, IssuerKey] = {}
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, dict):
            continue
        kid, kty, alg = item.get("kid"), item.get("kty"), item.get("alg")
        if not isinstance(kid, str) or not kid or item.get("use", "sig") != "sig":
            continue
        if alg is not None and alg not in ALGORITHMS:
            continue
        try:
            key: RSAKey | ECKey
            if kty == "RSA":
                key = RSAKey.import_key({k: item[k] for k in ("kty", "n", "e") if k in item})
                if key.raw_value.key_size < MIN_RSA_BITS:
                    continue
            elif kty == "EC" and item.get("crv") == "P-256":
                key = ECKey.import_key({k: item[k] for k in ("kty", "crv", "x", "y") if k in item})
            else:
                continue
        except (JoseError, ValueError, TypeError):
            continue
        if kid in seen:
            keys.pop(kid, None)
            continue
        seen.add(kid)
        keys[kid] = IssuerKey(kid, key, alg if isinstance(alg, str) else None)
    return keys
