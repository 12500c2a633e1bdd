"""Shared state: the registry of live tokens, revocations and the change feed.

The store is the registry of live tokens: a token whose record is missing or revoked is
rejected even when its signature is good, so wiping the store fails closed. Every write also
appends to a change feed (`changes_since`) that other gateway processes poll to drop stale
cache entries; that is how a revocation made by the CLI reaches a running server.

Backends: `sqlite:///PATH` (this package's `sqlite.py`) and `redis://`, `rediss://`, `unix://`,
`redis+sentinel://` (`redis.py`, shared by several instances). `open_store` picks one by URL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Config


@dataclass(frozen=True)
class TokenRecord:
    jti: str
    sub: str
    name: str
    grants: tuple[str, ...]
    iat: int
    exp: int
    parent: str | None = None
    revoked_at: int | None = None
    revoked_reason: str | None = None
    last_used_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["grants"] = list(self.grants)
        return data


class TokenStore(Protocol):
    async def put(self, record: TokenRecord) -> None: ...

    async def get(self, jti: str) -> TokenRecord | None: ...

    async def records(self, *, include_revoked: bool = True) -> list[TokenRecord]: ...

    async def revoke(self, jti: str, *, reason: str | None, at: int) -> list[str]:
        """Revoke `jti` and every token derived from it; returns the jtis newly revoked."""
        ...

    async def shorten(self, jti: str, *, exp: int) -> None:
        """Move the record's expiry earlier (never later), e.g. at the end of a rotation's grace."""
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

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def open_store(config: Config) -> TokenStore:
    """The backend `store.url` names."""
    scheme = config.store_url.partition(":")[0]
    if scheme == "sqlite":
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(config.store_sqlite_path())
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        from gateway.store.redis import RedisStore

        return RedisStore(config.store_url, prefix=config.store_prefix, timeout_ms=config.store_timeout_ms)
    raise ConfigError(f"store.url scheme {scheme!r} is not supported yet; use sqlite:///PATH")
