"""Shared state: the registry of live tokens, revocations and the change feed.

The store is the registry of live tokens: a token whose record is missing or revoked is
rejected even when its signature is good, so wiping the store fails closed. Every write also
appends to a change feed (`changes_since`) that other gateway processes poll to drop stale
cache entries; that is how a revocation made by the CLI reaches a running server.

Backends: `sqlite:///PATH` (this package's `sqlite.py`) and `redis://`, `rediss://`, `unix://`,
`redis+sentinel://` (`redis.py`, shared by several instances); `backends.open_store` picks one by
URL. Besides the records, a store offers what it can share between instances: rate-limit buckets
and (Redis only) the audit stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.core.audit_sinks import Sink
    from gateway.core.ratelimit import Bucket


@dataclass(frozen=True)
class TokenRecord:
    jti: str
    sub: str
    name: str
    grants: tuple[str, ...]
    iat: int
    exp: int
    parent: str | None = None  # the token this one was attenuated from: revoking that revokes this
    root: str | None = None  # the first token of the attenuation chain (None: this token is one)
    rotated_from: str | None = None  # the token this one replaced by rotation (not a parent)
    revoked_at: int | None = None
    revoked_reason: str | None = None
    last_used_at: int | None = None
    # The grants of every token this one descends from, its parent's first, as minted into its
    # `chain` claim: the registry compares the two (a leaked key cannot drop the ancestors' checks).
    chain: tuple[tuple[str, ...], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["grants"] = list(self.grants)
        del data["chain"]  # the lineage is told by parent and root; the chain is the registry's check
        return data


class TokenStore(Protocol):
    async def put(self, record: TokenRecord) -> None: ...

    async def put_derived(self, record: TokenRecord, *, now: int, max_live: int | None) -> str | None:
        """Put `record`, whose `parent` is set, only if that parent is live at `now` (registered, not
        revoked, not expired, not ending before `record`) and, with `max_live`, the lineage `record.root`
        has fewer than `max_live` live derived tokens; one atomic step, so that a revocation of the
        parent either comes after (and its cascade takes `record`) or refuses it. None when put, else
        why not: "missing", "revoked", "expired", "outlives" or "full"."""
        ...

    async def get(self, jti: str) -> TokenRecord | None: ...

    async def records(self, *, include_revoked: bool = True) -> list[TokenRecord]: ...

    async def revoke(self, jti: str, *, reason: str | None, at: int) -> list[str]:
        """Revoke `jti` and every token derived from it; returns the jtis newly revoked."""
        ...

    async def shorten(self, jti: str, *, exp: int) -> None:
        """Move the expiry of the record and of every token attenuated from it, transitively, earlier
        (never later), e.g. to the end of a rotation's grace: a child never outlives its parent."""
        ...

    async def touch(self, last_used: dict[str, int]) -> None: ...

    async def changes_since(self, cursor: str) -> tuple[str, list[str] | None]:
        """(new cursor, jtis changed after `cursor`), or None for the jtis when the store cannot
        tell what changed (it was flushed, or the feed was trimmed past `cursor`): the caller
        must then forget every cached record."""
        ...

    async def current_cursor(self) -> str: ...

    async def claim_once(self, key: str, *, expires_at: int) -> bool:
        """True the first time `key` is claimed before `expires_at` (a replay cache), False after."""
        ...

    async def remember(self, key: str, value: str, *, expires_at: int) -> None:
        """Keep `value` under `key` until `expires_at` (what a surface learned from an allowed answer,
        e.g. which app a release id belongs to), shared by every instance on the store."""
        ...

    async def recall(self, key: str) -> str | None:
        """The value `remember` kept under `key`, unless expired."""
        ...

    def rate_buckets(self, rate: float, burst: int) -> Bucket:
        """Token buckets at this rate: in this process, or shared by every instance on the store."""
        ...

    def audit_sink(self, maxlen: int) -> Sink | None:
        """The `redis` audit sink on this store, or None when the store has no stream to offer."""
        ...

    async def wait_for_change(self, cursor: str, timeout_s: float) -> None:
        """Return when the change feed may have moved past `cursor`, or after `timeout_s`."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
