"""Which store backend `store.url` names."""

from __future__ import annotations

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.store import TokenStore


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
