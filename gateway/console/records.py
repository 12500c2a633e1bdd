"""The token records the console lists: read once, then kept current through the store's change feed.

Reading every record costs about a second at 100,000 (SQLite), too much for each page view, so
the console keeps them in memory and applies the change feed (`changes_since`, the same feed
that carries revocations to every instance) before each use: a token minted or revoked anywhere
shows at once. Last use is written without a feed entry, so the list's last-used values (and
the last-used filter) may be up to `FULL_RELOAD_S` old; the rows shown are re-read fresh.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gateway.store import TokenRecord, TokenStore

FULL_RELOAD_S = 600.0


@dataclass
class RecordCache:
    store: TokenStore
    _records: dict[str, TokenRecord] = field(default_factory=dict)
    _ordered: list[TokenRecord] | None = None
    _cursor: str | None = None
    _loaded_at: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def current(self) -> list[TokenRecord]:
        """Every record, newest first, as of now (the change feed applied)."""
        async with self._lock:  # one reader of the feed at a time: the cursor only moves forward
            if self._cursor is None or time.monotonic() - self._loaded_at > FULL_RELOAD_S:
                await self._reload()
            else:
                await self._follow()
        if self._ordered is None:
            self._ordered = sorted(self._records.values(), key=lambda r: (r.iat, r.jti), reverse=True)
        return self._ordered

    def by_jti(self) -> dict[str, TokenRecord]:
        return self._records

    async def _reload(self) -> None:
        cursor = await self.store.current_cursor()  # before the read: a change during it is applied next time
        records = await self.store.records()
        self._records = {r.jti: r for r in records}
        self._ordered, self._cursor, self._loaded_at = None, cursor, time.monotonic()

    async def _follow(self) -> None:
        assert self._cursor is not None
        for _ in range(10):  # the feed answers in pages; a backlog deeper than this is cheaper to reread
            cursor, changed = await self.store.changes_since(self._cursor)
            if changed is None:
                await self._reload()
                return
            for jti in dict.fromkeys(changed):
                record = await self.store.get(jti)
                if record is None:
                    self._records.pop(jti, None)
                else:
                    self._records[jti] = record
            if changed:
                self._ordered = None
            if cursor == self._cursor or not changed:
                self._cursor = cursor
                return
            self._cursor = cursor
        await self._reload()

    def put(self, record: TokenRecord) -> None:
        """A record this process just wrote (the feed will bring it again; the list shows it now)."""
        self._records[record.jti] = record
        self._ordered = None
