"""Redis URLs: which URLs name Redis, the client a URL connects, and the URL as it may be shown.

Apart from the store's key layout and scripts (gateway/store/redis.py) because it answers a
different question: how to reach Redis (plain, TLS, unix socket or through Sentinel) and under
what budget. Every client the store opens, its main one and the watcher blocked in XREAD, comes
from `connect`, so the timeout and retry policy is stated once; `redact` keeps passwords out of
every message that names a store URL.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.errors import ConfigError

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


def is_redis_url(url: str) -> bool:
    return url.partition(":")[0] in REDIS_SCHEMES


def connect(url: str, *, timeout_s: float, extra_read_s: float = 0.0) -> tuple[Redis, list[Redis]]:
    """A client whose every call gives up after the budget: connect and read timeouts of
    `timeout_s` (plus `extra_read_s` for blocking reads), one immediate retry when a pooled
    connection turns out dropped (a Redis restart), none on timeouts. Also the helper clients
    to close with it (a Sentinel URL's connections to the sentinels)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s + extra_read_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "decode_responses": True,
        "client_name": "scopegate",
    }
    scheme = url.partition(":")[0]
    if scheme.endswith("+sentinel"):
        return _sentinel_client(url, options)
    try:
        return Redis.from_url(url, **options), []
    except ValueError as exc:
        raise ConfigError(f"store.url {redact(url)} is not a usable Redis URL ({exc})") from None


def _sentinel_client(url: str, options: dict[str, Any]) -> tuple[Redis, list[Redis]]:
    """`redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]` (also `rediss+sentinel`):
    the master of SERVICE as the sentinels report it, followed across failovers."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"store.url {redact(url)}: sentinel addresses are HOST:PORT, comma-separated")
        hosts.append((host.strip("[]"), int(port)))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(f"store.url {redact(url)}: expected .../SERVICE or .../SERVICE/DB after the sentinels")
    service = path[0]
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    options["db"] = int(path[1]) if len(path) == 2 else 0
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    sentinel_options = {"socket_timeout": options["socket_connect_timeout"],
                        "socket_connect_timeout": options["socket_connect_timeout"]}
    for key, value in parse_qsl(parts.query):
        if key == "sentinel_password":
            sentinel_options["password"] = value
        else:
            raise ConfigError(f"store.url {redact(url)}: unknown option {key!r} (only sentinel_password)")
    # redis-py before 8.2 ships Sentinel without type hints; typed as Any it checks the same on every version.
    sentinel_class: Any = Sentinel
    sentinel = sentinel_class(hosts, sentinel_kwargs=sentinel_options, **options)
    client: Redis = sentinel.master_for(service, redis_class=Redis)
    return client, list(sentinel.sentinels)


def redact(url: str) -> str:
    """The URL without its passwords (user info, `*password*` query options), for messages."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:***@{hosts}" if user else f":***@{hosts}")
    if "password" in parts.query.lower():
        parts = parts._replace(query="&".join(
            f"{key}=***" if "password" in key.lower() else f"{key}={value}"
            for key, value in parse_qsl(parts.query, keep_blank_values=True)))
    return parts.geturl()
