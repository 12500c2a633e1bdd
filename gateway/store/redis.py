"""The shared store: Redis, for several gateway instances behind one load balancer.

Keys (all under `store.prefix`, default `scopegate:`):

    tok:{jti}        hash   one token record (sub, name, grants as JSON, iat, exp, parent, revoked_at, ...)
    tokens           zset   every jti, scored by iat (the listing order)
    children:{jti}   set    jtis attenuated from {jti}: the revocation cascade (a rotation's successor
                            is not a child of the token it replaced)
    lineage:{root}   set    jtis derived, at any depth, from the root token {root}: the cap on live ones
    changes          stream the change feed: one entry {jti, n} per write, trimmed with MAXLEN ~
    changes:n        string the feed's entry counter (`n` of the newest entry)
    epoch            string a random id written when the feed starts; gone after FLUSHALL or a restart
                            without persistence, which tells every instance to forget its cache
    once:{key}       string the replay cache of `claim_once`, expiring at the claim's expiry
    fact:{key}       string a fact a surface remembers (`remember`/`recall`: a release id's app), expiring
    rl:{jti}         hash   a shared token bucket (`RedisBuckets`, gateway/store/redis_ratelimit.py)
    audit            stream the `redis` audit sink (gateway/store/redis_audit.py)

Every write that changes what a token may do (put, revoke with its cascade, shorten) is one Lua
script, so it and its change-feed entry land together. Cursors of the feed are
`EPOCH:STREAM-ID:N`; `changes_since` answers None (forget everything) when the epoch changed
(flushed, or restarted empty), when the entry after the cursor is not N + 1 (trimmed away, or
the stream was recreated), or when the stream went back behind the cursor (restored from an
older snapshot).

Fail closed: every call runs under the `store.timeout_ms` budget (socket connect and read
timeouts, one immediate retry on a dropped connection, and an overall deadline); any Redis or
socket error becomes StateUnavailable, i.e. 503 `state_unavailable`, never an allow.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.core.audit_sinks import Sink
from gateway.core.ratelimit import Bucket
from gateway.errors import StateUnavailable
from gateway.store import TokenRecord
from gateway.store.redis_audit import RedisSink
from gateway.store.redis_ratelimit import BUCKET_SCRIPT, RedisBuckets
from gateway.store.redis_scripts import FEED, PUT, PUT_DERIVED, REVOKE, SHORTEN, TOUCH
from gateway.store.redis_url import connect, redact

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT_MS", "FEED_MAXLEN", "RedisBuckets", "RedisStore", "redact"]

DEFAULT_PREFIX = "scopegate:"
DEFAULT_TIMEOUT_MS = 500
FEED_MAXLEN = 100_000
_FEED_BATCH = 10_000
_CHUNK = 1_000


class RedisStore:
    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 feed_maxlen: int = FEED_MAXLEN) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_ms / 1000
        self.feed_maxlen = feed_maxlen
        self.client, self._helpers = connect(url, timeout_s=self.timeout_s)
        # Connect, read, one retry after a dropped connection, plus slack: never much longer.
        self._deadline_s = 3 * self.timeout_s + 0.05
        self._put = self.client.register_script(PUT)
        self._put_derived = self.client.register_script(PUT_DERIVED)
        self._revoke = self.client.register_script(REVOKE)
        self._shorten = self.client.register_script(SHORTEN)
        self._touch = self.client.register_script(TOUCH)
        self._feed = self.client.register_script(FEED)
        self._bucket = self.client.register_script(BUCKET_SCRIPT)
        self._k_tokens = prefix + "tokens"
        self._k_changes = prefix + "changes"
        self._k_epoch = prefix + "epoch"
        self._k_seq = prefix + "changes:n"
        self._feed_keys = [self._k_epoch, self._k_changes, self._k_seq]
        self._watcher: Redis | None = None  # its own connection, blocked in XREAD (wait_for_change)
        self._watch_failed = False

    def _record_key(self, jti: str) -> str:
        return f"{self.prefix}tok:{jti}"

    @asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Every Redis failure, and every call over the budget, is StateUnavailable (503)."""
        try:
            async with asyncio.timeout(self._deadline_s):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            # Clients see this message: it names no host (the URL is in the operator's config).
            raise StateUnavailable(
                f"the shared token store (Redis) is unavailable or slower than store.timeout_ms "
                f"({what}: {exc.__class__.__name__}); the request was not forwarded, retry shortly"
            ) from None

    # --- token records -------------------------------------------------------------------------

    async def put(self, record: TokenRecord) -> None:
        async with self._guard("put"):
            await self._put(keys=self._write_keys(record), args=self._write_args(record))

    async def put_derived(self, record: TokenRecord, *, now: int, max_live: int | None) -> str | None:
        if record.parent is None:
            raise ValueError("put_derived needs a record with a parent")
        keys = [*self._write_keys(record), self._record_key(record.parent)]
        args = [now, -1 if max_live is None else max_live, self.prefix, *self._write_args(record)]
        async with self._guard("put"):
            outcome = await self._put_derived(keys=keys, args=args)
        text = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        return None if text == "ok" else text

    def _write_keys(self, record: TokenRecord) -> list[str]:
        children = "" if record.parent is None else f"{self.prefix}children:{record.parent}"
        lineage = "" if record.root is None else f"{self.prefix}lineage:{record.root}"
        return [self._record_key(record.jti), self._k_tokens, self._k_changes, self._k_seq, children, lineage]

    def _write_args(self, record: TokenRecord) -> list[str | int]:
        args: list[str | int] = [record.jti, record.iat, self.feed_maxlen]
        for name, value in _fields(record).items():
            args += [name, value]
        return args

    async def get(self, jti: str) -> TokenRecord | None:
        async with self._guard("get"):
            data = await self.client.hgetall(self._record_key(jti))
        return _record(jti, data) if data else None

    async def records(self, *, include_revoked: bool = True) -> list[TokenRecord]:
        out: list[TokenRecord] = []
        async with self._guard("records"):
            jtis = [str(j) for j in await self.client.zrange(self._k_tokens, 0, -1)]
        for start in range(0, len(jtis), _CHUNK):
            chunk = jtis[start:start + _CHUNK]
            async with self._guard("records"):
                pipe = self.client.pipeline(transaction=False)
                for jti in chunk:
                    pipe.hgetall(self._record_key(jti))
                rows = await pipe.execute()
            for jti, data in zip(chunk, rows, strict=True):
                if data:
                    record = _record(jti, data)
                    if include_revoked or record.revoked_at is None:
                        out.append(record)
        return out

    async def revoke(self, jti: str, *, reason: str | None, at: int) -> list[str]:
        async with self._guard("revoke"):
            revoked = await self._revoke(
                keys=[self._k_changes, self._k_seq, self._record_key(jti)],
                args=[self.prefix, jti, at, self.feed_maxlen, "0" if reason is None else "1", reason or ""])
        return [str(item) for item in revoked]

    async def shorten(self, jti: str, *, exp: int) -> None:
        async with self._guard("shorten"):
            await self._shorten(keys=[self._k_changes, self._k_seq], args=[exp, jti, self.feed_maxlen, self.prefix])

    async def touch(self, last_used: dict[str, int]) -> None:
        items = list(last_used.items())
        for start in range(0, len(items), _CHUNK):
            chunk = items[start:start + _CHUNK]
            async with self._guard("touch"):
                await self._touch(keys=[self._record_key(jti) for jti, _ in chunk], args=[at for _, at in chunk])

    # --- the change feed -----------------------------------------------------------------------

    async def changes_since(self, cursor: str) -> tuple[str, list[str] | None]:
        epoch, _, rest = cursor.partition(":")
        position, _, count = rest.partition(":")
        async with self._guard("changes"):
            reply = await self._feed(keys=self._feed_keys, args=[
                "since", epoch, position or "-", count or "-", _FEED_BATCH, secrets.token_hex(8)])
        new_cursor = f"{reply[0]}:{reply[1]}:{reply[2]}"
        if reply[3] == "reset":
            return new_cursor, None
        return new_cursor, [str(jti) for jti in reply[4:]]

    async def current_cursor(self) -> str:
        async with self._guard("cursor"):
            reply = await self._feed(keys=self._feed_keys, args=["current", "", "", "", 0, secrets.token_hex(8)])
        return f"{reply[0]}:{reply[1]}:{reply[2]}"

    # --- the rest ------------------------------------------------------------------------------

    async def claim_once(self, key: str, *, expires_at: int) -> bool:
        # A claim is held at least a second, so that an already-expired one still cannot be
        # replayed within the same second (the SQLite store behaves the same way).
        until = max(expires_at, int(time.time()) + 1)
        async with self._guard("claim"):
            claimed = await self.client.set(f"{self.prefix}once:{key}", "1", nx=True, exat=until)
        return bool(claimed)

    async def remember(self, key: str, value: str, *, expires_at: int) -> None:
        async with self._guard("remember"):
            if expires_at <= int(time.time()):
                await self.client.delete(f"{self.prefix}fact:{key}")
            else:
                await self.client.set(f"{self.prefix}fact:{key}", value, exat=expires_at)

    async def recall(self, key: str) -> str | None:
        async with self._guard("recall"):
            value = await self.client.get(f"{self.prefix}fact:{key}")
        return None if value is None else (value.decode() if isinstance(value, bytes) else str(value))

    async def take(self, key: str, *, rate: float, burst: int) -> int:
        """One request from the shared bucket `key`: 0 when allowed, else the ms to wait."""
        ttl_ms = math.ceil(burst / rate * 1000) + 1000
        async with self._guard("rate limit"):
            allowed, wait = await self._bucket(keys=[f"{self.prefix}rl:{key}"], args=[rate, burst, ttl_ms])
        return 0 if int(allowed) == 1 else max(1, int(wait))

    def rate_buckets(self, rate: float, burst: int) -> Bucket:
        """Buckets shared by every instance on this Redis."""
        return RedisBuckets(self, rate, burst)

    def audit_sink(self, maxlen: int) -> Sink | None:
        """The `redis` audit sink: a stream next to the token records."""
        return RedisSink(self.client, self.prefix + "audit", maxlen)

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self.client.ping()

    async def wait_for_change(self, cursor: str, timeout_s: float) -> None:
        """Return as soon as the feed has an entry after `cursor`, after `timeout_s`, or at once
        when the connection breaks (Redis stopped or restarted): the caller syncs next, so a
        revocation or an outage is seen within milliseconds rather than at the next poll. After
        a second failure in a row it just waits `timeout_s` (the caller is polling a dead store)."""
        position = cursor.partition(":")[2].partition(":")[0] or "0-0"
        if self._watcher is None:
            self._watcher, helpers = connect(self.url, timeout_s=self.timeout_s, extra_read_s=timeout_s)
            self._helpers += helpers
        try:
            await self._watcher.xread({self._k_changes: position}, count=1, block=max(1, int(timeout_s * 1000)))
            self._watch_failed = False
        except (RedisError, OSError, TimeoutError):
            if self._watch_failed:
                await asyncio.sleep(timeout_s)
            self._watch_failed = True

    async def close(self) -> None:
        # Closing never fails a shutdown, even when Redis is already gone.
        for client in (self.client, self._watcher, *self._helpers):
            if client is None:
                continue
            try:
                async with asyncio.timeout(self._deadline_s):
                    await client.aclose()
            except (RedisError, OSError, TimeoutError):
                pass


def _fields(record: TokenRecord) -> dict[str, str | int]:
    fields: dict[str, str | int] = {"sub": record.sub, "name": record.name, "grants": json.dumps(list(record.grants)),
                                    "iat": record.iat, "exp": record.exp}
    optional: dict[str, str | int | None] = {"parent": record.parent, "root": record.root,
                                             "rotated_from": record.rotated_from, "revoked_at": record.revoked_at,
                                             "revoked_reason": record.revoked_reason,
                                             "last_used_at": record.last_used_at}
    fields.update({name: value for name, value in optional.items() if value is not None})
    if record.chain:
        fields["chain"] = json.dumps([list(level) for level in record.chain])
    return fields


def _record(jti: str, data: dict[Any, Any]) -> TokenRecord:
    def number(name: str) -> int | None:
        value = data.get(name)
        return None if value is None else int(value)

    def text(name: str) -> str | None:
        value = data.get(name)
        return None if value is None else str(value)

    parent, reason = data.get("parent"), data.get("revoked_reason")
    return TokenRecord(
        jti=jti, sub=str(data["sub"]), name=str(data["name"]), grants=tuple(json.loads(data["grants"])),
        iat=int(data["iat"]), exp=int(data["exp"]), parent=None if parent is None else str(parent),
        revoked_at=number("revoked_at"), revoked_reason=None if reason is None else str(reason),
        last_used_at=number("last_used_at"), root=text("root"), rotated_from=text("rotated_from"),
        chain=tuple(tuple(level) for level in json.loads(data["chain"])) if data.get("chain") else (),
    )
