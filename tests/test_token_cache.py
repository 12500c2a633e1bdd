"""The token caches are bounded by memory (`limits.token_cache_mb`), not by a count (issue 19).

Real parts throughout: tokens minted and signed with a generated keyring, verified by
`TokenVerifier`, checked by `TokenRegistry` over a real SQLite store. Small budgets keep the
tests fast; what holds for 300 entries in 200 KiB holds for 100,000 in 128 MiB (the charge per
entry is the same and is checked against tracemalloc).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import time
import tracemalloc
from pathlib import Path

import pytest

from gateway.core.grants import parse_grant
from gateway.core.keyring import Keyring
from gateway.core.registry import TokenRegistry
from gateway.core.sized_cache import SizedLRU
from gateway.core.tokens import DEFAULT_CACHE_BYTES, TokenIssuer, TokenVerifier
from gateway.errors import Unauthenticated
from gateway.store.sqlite import SqliteStore

ISSUER = AUDIENCE = "scopegate-test"
GRANTS = (parse_grant("viewer@app:web-staging"), parse_grant("deployer@env:staging"))


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture(scope="module")
def tokens(keyring: Keyring) -> list[str]:
    issuer = TokenIssuer(keyring, ISSUER, AUDIENCE)
    return [issuer.mint(sub=f"ci:github:acme/web-{i}", name=f"deploy-web-{i}", grants=GRANTS, ttl_s=3600)[0]
            for i in range(600)]


def per_entry_charge(keyring: Keyring, token: str) -> int:
    probe = TokenVerifier(keyring, ISSUER, AUDIENCE)
    probe.verify(token)
    return int(probe._cache.bytes)


def test_a_small_budget_evicts_the_least_recently_used(keyring: Keyring, tokens: list[str]) -> None:
    charge = per_entry_charge(keyring, tokens[0])
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, cache_bytes=6 * charge)
    for token in tokens[:10]:
        verifier.verify(token)
        assert verifier.cache_stats()["bytes"] <= verifier.cache_bytes
    held = len(verifier._cache)
    assert 2 <= held < 10, held
    assert verifier.cache_stats()["evictions"] == 10 - held
    assert verifier.cache_hits == 0
    verifier.verify(tokens[10 - held])  # the oldest one still held: used, so now the newest
    assert verifier.cache_hits == 1
    verifier.verify(tokens[10])  # evicts the least recently used, tokens[10 - held + 1]
    verifier.verify(tokens[10 - held])
    assert verifier.cache_hits == 2
    verifier.verify(tokens[10 - held + 1])
    assert verifier.cache_hits == 2  # it was evicted: verified again


def test_a_budget_sized_for_the_working_set_keeps_every_token(keyring: Keyring, tokens: list[str]) -> None:
    # 600 tokens with two grants each in 1 MiB: 100,000 take ~60 MiB of the default 128 alike.
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, cache_bytes=1024 * 1024)
    for token in tokens:
        verifier.verify_authorization([f"Bearer {token}".encode()])
    assert len(verifier._cache) == len(tokens) and verifier.cache_stats()["evictions"] == 0
    for token in tokens:
        verifier.verify_authorization([f"Bearer {token}".encode()])
        verifier.verify(token)
    assert verifier.cache_hits == 2 * len(tokens)
    per_token = verifier.cache_stats()["bytes"] / len(tokens)
    assert per_token * 100_000 < DEFAULT_CACHE_BYTES * 0.6, per_token


def test_the_charge_covers_what_the_entries_really_hold(keyring: Keyring, tokens: list[str]) -> None:
    """The budget bounds memory only if each entry is charged at least what it holds: compare the
    charge with the bytes tracemalloc sees still allocated after caching 600 tokens."""
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, cache_bytes=64 * 1024 * 1024)
    verifier.verify(tokens[0])
    verifier.clear_cache()  # the verifier's own one-time state (the key) is not an entry's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for token in tokens:
            verifier.verify(token)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    charged = verifier.cache_stats()["bytes"]
    assert 0.95 * held <= charged <= 1.5 * held, (charged / len(tokens), held / len(tokens))


def test_the_map_by_header_value_stays_within_its_part_of_the_budget(keyring: Keyring, tokens: list[str]) -> None:
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, cache_bytes=4 * 1024 * 1024)  # 1/16 of it: 256 KiB
    first = [verifier.verify_authorization([f"Bearer {token}".encode()]) for token in tokens]
    assert 0 < verifier._recent_bytes <= 256 * 1024 and len(verifier._recent) < len(tokens)
    assert verifier.cache_stats()["bytes"] <= verifier.cache_bytes
    # Whatever the map dropped, the digest-keyed cache answers with the very same claims.
    assert all(verifier.verify_authorization([f"Bearer {token}".encode()]) is claims
               for token, claims in zip(tokens, first, strict=True))
    assert verifier.cache_hits == len(tokens)


def test_a_zero_budget_caches_nothing(keyring: Keyring, tokens: list[str]) -> None:
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, cache_bytes=0)
    for _ in range(3):
        assert verifier.verify(tokens[0]).name == "deploy-web-0"
    assert len(verifier._cache) == 0 and verifier.cache_hits == 0
    for _ in range(3):
        assert verifier.verify_authorization([f"Bearer {tokens[0]}".encode()]).name == "deploy-web-0"
    assert len(verifier._recent) == 0 and verifier.cache_hits == 0


def test_only_the_exact_token_is_served_from_the_cache(keyring: Keyring, tokens: list[str]) -> None:
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
    token = tokens[1]
    verifier.verify(token)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    for variant in (token[:-1] + alphabet[last ^ 1], token[:-1], token + "A", token.replace("sgt_", "SGT_", 1),
                    token[:40] + alphabet[alphabet.index(token[40]) ^ 32] + token[41:]):
        with pytest.raises(Unauthenticated):
            verifier.verify(variant)
        with pytest.raises(Unauthenticated):
            verifier.verify_authorization([f"Bearer {variant}".encode()])
    assert len(verifier._cache) == 1 and verifier.cache_hits == 0
    assert hashlib.sha256(token.encode()).digest() in verifier._cache


def test_an_expired_token_is_refused_from_the_cache_at_both_doors(keyring: Keyring) -> None:
    clock = Clock()
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, clock=clock)
    token, _ = TokenIssuer(keyring, ISSUER, AUDIENCE, clock=clock).mint(
        sub="ci:x", name="short", grants=GRANTS, ttl_s=60)
    header = [f"FlyV1 {token}".encode()]
    first = verifier.verify_authorization(header)
    assert verifier.verify(token) is first and verifier.verify_authorization(header) is first
    clock.now += 60 + 6  # past exp and the leeway
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="expired"):
            verifier.verify_authorization(header)
        with pytest.raises(Unauthenticated, match="expired"):
            verifier.verify(token)
    assert len(verifier._cache) == 0 and len(verifier._recent) == 0


def test_an_expired_header_leaves_the_map_by_header_value_with_its_bytes(keyring: Keyring) -> None:
    """The map by header value is dropped whole when its bytes reach its share of the budget: an
    entry that leaves because its token expired must give its bytes back, or short-lived tokens
    (CI's) inflate the count until the map is dropped for nothing and `cache_stats` overstates it."""
    clock = Clock()
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, clock=clock)
    issuer = TokenIssuer(keyring, ISSUER, AUDIENCE, clock=clock)
    for i in range(3):
        token, _ = issuer.mint(sub="ci:x", name=f"short-{i}", grants=GRANTS, ttl_s=60)
        header = [f"Bearer {token}".encode()]
        verifier.verify_authorization(header)
        assert len(verifier._recent) == 1 and verifier._recent_bytes > 0
        clock.now += 60 + 6
        with pytest.raises(Unauthenticated, match="expired"):
            verifier.verify_authorization(header)
        assert len(verifier._recent) == 0 and verifier._recent_bytes == 0


def registry_over(path: Path, keyring: Keyring, cache_bytes: int) -> TokenRegistry:
    return TokenRegistry(SqliteStore(path), TokenIssuer(keyring, ISSUER, AUDIENCE),
                         known_roles=lambda: {"viewer", "deployer"}, environments=frozenset({"staging"}),
                         default_ttl_s=3600, max_ttl_s=86400, cache_bytes=cache_bytes)


def test_a_revoked_token_is_refused_though_its_signature_is_cached(tmp_path: Path, keyring: Keyring) -> None:
    async def work() -> None:
        registry = registry_over(tmp_path / "state.db", keyring, DEFAULT_CACHE_BYTES)
        verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
        minted = await registry.mint(grants=["viewer@app:web-staging"], ttl_s=600, name="leaked", subject="ci:x")
        header = [f"Bearer {minted.token}".encode()]
        await registry.check(verifier.verify_authorization(header))
        await registry.check(verifier.verify_authorization(header))
        assert verifier.cache_hits == 1 and len(registry._status) == 1
        await registry.revoke(minted.record.jti, reason="leaked")
        claims = verifier.verify_authorization(header)  # the signature is still good (and cached)...
        assert verifier.cache_hits == 2
        with pytest.raises(Unauthenticated, match="revoked"):
            await registry.check(claims)  # ...the registry refuses it
        with pytest.raises(Unauthenticated, match="revoked"):
            await registry.check(claims)  # and keeps refusing it from its own cache
        await registry.store.close()

    asyncio.run(work())


def test_the_registry_cache_is_bounded_by_memory_and_still_answers(tmp_path: Path, keyring: Keyring) -> None:
    async def work() -> None:
        registry = registry_over(tmp_path / "state.db", keyring, 4 * 1024)
        verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
        minted = [await registry.mint(grants=["viewer@app:web-staging"], ttl_s=600, name=f"t{i}", subject="ci:x")
                  for i in range(40)]
        claims = [verifier.verify(m.token) for m in minted]
        for _ in range(2):
            for item in claims:
                await registry.check(item)
                assert registry._status.bytes <= 4 * 1024
        assert 1 <= len(registry._status) < 40 and registry._status.evictions > 0
        # A token whose record was evicted is read from the store again: revocation still holds.
        await registry.revoke(minted[0].record.jti, reason="gone")
        with pytest.raises(Unauthenticated, match="revoked"):
            await registry.check(claims[0])
        for item in claims[1:]:
            await registry.check(item)
        await registry.store.close()

    asyncio.run(work())


def test_the_registry_charge_covers_tokens_with_many_grants_of_their_own(tmp_path: Path, keyring: Keyring) -> None:
    """The registry's bound must hold alone (whatever the verifier keeps): once the verifier's shared
    pool of grants is full or cleared (a keyring reload), each record's claims hold their own grants.
    A child token of `viewer@app:*` may carry ~250 literal app grants in 8 KiB: ~45 KB of Grant
    objects that a charge of the Claims alone (~2.6 KB) would let through ~17 times over."""
    async def work() -> None:
        registry = TokenRegistry(SqliteStore(tmp_path / "state.db"), TokenIssuer(keyring, ISSUER, AUDIENCE),
                                 known_roles=lambda: {"viewer"}, environments=frozenset({"staging"}),
                                 default_ttl_s=3600, max_ttl_s=86400, cache_bytes=64 * 1024 * 1024)
        verifier = TokenVerifier(keyring, ISSUER, AUDIENCE, cache_bytes=1024 * 1024)  # a pool of 128 KiB
        minted = [await registry.mint(grants=[f"viewer@app:a{t:02d}x{i:03d}" for i in range(250)], ttl_s=600,
                                      name=f"wide-{t}", subject="ci:x") for t in range(30)]
        await registry.check(verifier.verify(minted[0].token))
        registry.forget_all()
        verifier.clear_cache()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for item in minted:
                await registry.check(verifier.verify(item.token))
            verifier.clear_cache()  # the verifier lets go of them all: only the registry holds them now
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(registry._status) == len(minted)
        assert registry._status.bytes >= 0.95 * held, (registry._status.bytes, held)
        await registry.store.close()

    asyncio.run(work())


def test_sized_lru_accounts_every_put_pop_and_clear() -> None:
    cache: SizedLRU[str, str] = SizedLRU(1000, len, key_bytes=10)
    base = cache._entry_bytes
    cache.put("a", "x" * 100)
    cache.put("b", "y" * 100)
    assert cache.bytes == 2 * (base + 100)
    cache.put("a", "z" * 50)  # replaced: charged anew, and now the most recent
    assert cache.bytes == 2 * base + 150 and list(cache.entries) == ["b", "a"]
    assert cache.pop("b") == "y" * 100 and cache.bytes == base + 50
    assert cache.pop("b") is None and cache.bytes == base + 50
    cache.put("big", "w" * 2000)  # larger than the whole budget: never kept
    assert "big" not in cache and cache.bytes == base + 50
    for i in range(20):
        cache.put(str(i), "v" * 100)
        assert cache.bytes <= 1000
    assert cache.get("a") is None and cache.evictions > 0
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        SizedLRU(-1, len)
