"""The embedded store: one SQLite file, for a single gateway instance and its CLI.

WAL mode lets the server read while the CLI writes. Calls are synchronous under an async
interface: each is a primary-key lookup or a small write on a local file, cheaper than a
thread hop, and the hot path reaches the store only on a cache miss.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path

from gateway.core.audit_sinks import Sink
from gateway.core.ratelimit import Bucket, LocalBuckets
from gateway.errors import StateUnavailable
from gateway.store import TokenRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY,
    sub TEXT NOT NULL,
    name TEXT NOT NULL,
    grants TEXT NOT NULL,
    iat INTEGER NOT NULL,
    exp INTEGER NOT NULL,
    parent TEXT,
    revoked_at INTEGER,
    revoked_reason TEXT,
    last_used_at INTEGER,
    root TEXT,
    rotated_from TEXT,
    chain TEXT
);
CREATE INDEX IF NOT EXISTS tokens_parent ON tokens(parent);
CREATE TABLE IF NOT EXISTS once (
    key TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS facts (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    jti TEXT NOT NULL
);
"""
_COLUMNS = ("jti, sub, name, grants, iat, exp, parent, revoked_at, revoked_reason, last_used_at, root, rotated_from, "
            "chain")
# A token and everything attenuated from it, transitively (parameter: the token's jti).
_TREE = "WITH RECURSIVE tree(jti) AS (SELECT ? UNION SELECT t.jti FROM tokens t JOIN tree ON t.parent = tree.jti)"
# Columns added after the first release: a store created before them gets them on open.
_ADDED_COLUMNS = (("root", "TEXT"), ("rotated_from", "TEXT"), ("chain", "TEXT"))


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Owner-only, like the keyring: token records name subjects and grants. SQLite creates
            # its -wal and -shm files with the database file's mode. Only when it is missing: closing a
            # descriptor of the file drops every POSIX lock this process holds on it, those of open
            # connections too, and another process may then checkpoint and remove the WAL under them.
            if not self.path.exists():
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
            self._prepare()
        except (sqlite3.Error, OSError) as exc:
            raise StateUnavailable(f"the token store {self.path} cannot be opened ({exc})") from None

    def _prepare(self) -> None:
        """WAL mode, the schema and the columns added since: several processes may open the same
        file at once (a server's workers, the CLI), and SQLite answers one of them "locked" at once
        rather than waiting when both change the schema; that one retries."""
        for attempt in range(8):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA busy_timeout=5000")
                self._db.executescript(_SCHEMA)
                self._add_columns()
                return
            except sqlite3.OperationalError as exc:
                if attempt == 7 or not ("locked" in str(exc) or "duplicate column" in str(exc)):
                    raise
                time.sleep(0.02 * (attempt + 1))

    def _add_columns(self) -> None:
        """Columns added after the first release, added to an older store under the write lock:
        two processes opening it at once (the workers of one server) must not both add them."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            have = {str(row[1]) for row in self._db.execute("PRAGMA table_info(tokens)").fetchall()}
            for column, kind in _ADDED_COLUMNS:
                if column not in have:
                    self._db.execute(f"ALTER TABLE tokens ADD COLUMN {column} {kind}")
            self._db.execute("CREATE INDEX IF NOT EXISTS tokens_root ON tokens(root)")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.rollback()
            raise

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"the token store failed ({exc.__class__.__name__}); retry shortly") from None

    async def put(self, record: TokenRecord) -> None:
        self._run("BEGIN IMMEDIATE")
        try:
            self._insert(record)
            self._run("COMMIT")
        except BaseException:
            self._db.rollback()
            raise

    async def put_derived(self, record: TokenRecord, *, now: int, max_live: int | None) -> str | None:
        # BEGIN IMMEDIATE takes the write lock first: a revocation (also IMMEDIATE) runs wholly before
        # this check, and is refused by it, or wholly after the insert, and its cascade takes it.
        self._run("BEGIN IMMEDIATE")
        try:
            problem = self._derivation_problem(record, now, max_live)
            if problem is None:
                self._insert(record)
            self._run("COMMIT")
        except BaseException:
            self._db.rollback()
            raise
        return problem

    def _derivation_problem(self, record: TokenRecord, now: int, max_live: int | None) -> str | None:
        rows = self._run("SELECT revoked_at, exp FROM tokens WHERE jti = ?", (record.parent,))
        if not rows:
            return "missing"
        revoked_at, parent_exp = rows[0]
        if revoked_at is not None:
            return "revoked"
        if int(str(parent_exp)) <= now:
            return "expired"
        if record.exp > int(str(parent_exp)):
            return "outlives"
        if max_live is not None:
            live = self._run("SELECT COUNT(*) FROM tokens WHERE root = ? AND revoked_at IS NULL AND exp > ?",
                             (record.root, now))
            if int(str(live[0][0])) >= max_live:
                return "full"
        return None

    def _insert(self, record: TokenRecord) -> None:
        self._run(f"INSERT INTO tokens ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", (
            record.jti, record.sub, record.name, json.dumps(list(record.grants)), record.iat, record.exp,
            record.parent, record.revoked_at, record.revoked_reason, record.last_used_at, record.root,
            record.rotated_from, json.dumps([list(level) for level in record.chain]) if record.chain else None))
        self._run("INSERT INTO changes (jti) VALUES (?)", (record.jti,))

    async def get(self, jti: str) -> TokenRecord | None:
        rows = self._run(f"SELECT {_COLUMNS} FROM tokens WHERE jti = ?", (jti,))
        return _record(rows[0]) if rows else None

    async def records(self, *, include_revoked: bool = True) -> list[TokenRecord]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        return [_record(row) for row in self._run(f"SELECT {_COLUMNS} FROM tokens {where} ORDER BY iat, jti")]

    async def revoke(self, jti: str, *, reason: str | None, at: int) -> list[str]:
        self._run("BEGIN IMMEDIATE")
        try:
            # The token and everything derived from it (rotations, attenuations), transitively.
            # Already expired descendants need no mark (nothing accepts them): fewer writes.
            rows = self._run(f"{_TREE} SELECT t.jti FROM tokens t JOIN tree USING (jti) "
                             "WHERE t.revoked_at IS NULL AND (t.jti = ? OR t.exp > ?)", (jti, jti, at))
            revoked = [str(row[0]) for row in rows]
            for item in revoked:
                self._run("UPDATE tokens SET revoked_at = ?, revoked_reason = ? WHERE jti = ?", (at, reason, item))
                self._run("INSERT INTO changes (jti) VALUES (?)", (item,))
            self._run("COMMIT")
        except BaseException:
            self._db.rollback()
            raise
        return revoked

    async def shorten(self, jti: str, *, exp: int) -> None:
        self._run("BEGIN IMMEDIATE")
        try:
            rows = self._run(f"{_TREE} SELECT t.jti FROM tokens t JOIN tree USING (jti) WHERE t.exp > ?", (jti, exp))
            for (item,) in rows:
                self._run("UPDATE tokens SET exp = ? WHERE jti = ?", (exp, item))
                self._run("INSERT INTO changes (jti) VALUES (?)", (item,))
            self._run("COMMIT")
        except BaseException:
            self._db.rollback()
            raise

    async def touch(self, last_used: dict[str, int]) -> None:
        if not last_used:
            return
        try:
            self._db.executemany("UPDATE tokens SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) WHERE jti = ?",
                                 [(at, jti) for jti, at in last_used.items()])
        except sqlite3.Error as exc:
            raise StateUnavailable(f"the token store failed ({exc.__class__.__name__})") from None

    async def changes_since(self, cursor: str) -> tuple[str, list[str] | None]:
        rows = self._run("SELECT seq, jti FROM changes WHERE seq > ? ORDER BY seq LIMIT 10000", (int(cursor),))
        if not rows:
            return cursor, []
        return str(rows[-1][0]), [str(row[1]) for row in rows]

    async def current_cursor(self) -> str:
        rows = self._run("SELECT COALESCE(MAX(seq), 0) FROM changes")
        return str(rows[0][0])

    async def claim_once(self, key: str, *, expires_at: int) -> bool:
        now = int(time.time())
        self._run("BEGIN IMMEDIATE")
        try:
            self._run("DELETE FROM once WHERE expires_at < ?", (now,))
            claimed = self._run("INSERT OR IGNORE INTO once (key, expires_at) VALUES (?, ?) RETURNING key",
                                (key, expires_at))
            self._run("COMMIT")
        except BaseException:
            self._db.rollback()
            raise
        return bool(claimed)

    async def remember(self, key: str, value: str, *, expires_at: int) -> None:
        self._run("BEGIN IMMEDIATE")
        try:
            self._run("DELETE FROM facts WHERE expires_at < ?", (int(time.time()),))
            self._run("INSERT OR REPLACE INTO facts (key, value, expires_at) VALUES (?, ?, ?)",
                      (key, value, expires_at))
            self._run("COMMIT")
        except BaseException:
            self._db.rollback()
            raise

    async def recall(self, key: str) -> str | None:
        rows = self._run("SELECT value FROM facts WHERE key = ? AND expires_at >= ?", (key, int(time.time())))
        return str(rows[0][0]) if rows else None

    def rate_buckets(self, rate: float, burst: int) -> Bucket:
        """One instance per SQLite file: buckets in this process."""
        return LocalBuckets(rate, burst)

    def audit_sink(self, maxlen: int) -> Sink | None:
        return None  # no shared stream: the redis sink needs a Redis store

    async def wait_for_change(self, cursor: str, timeout_s: float) -> None:
        """SQLite cannot say when another process writes: the change feed is polled."""
        await asyncio.sleep(timeout_s)

    async def ping(self) -> None:
        self._run("SELECT 1")

    async def close(self) -> None:
        self._db.close()


def _record(row: tuple[object, ...]) -> TokenRecord:
    jti, sub, name, grants, iat, exp, parent, revoked_at, reason, last_used, root, rotated_from, chain = row
    return TokenRecord(
        jti=str(jti), sub=str(sub), name=str(name), grants=tuple(json.loads(str(grants))), iat=int(str(iat)),
        exp=int(str(exp)), parent=None if parent is None else str(parent),
        revoked_at=None if revoked_at is None else int(str(revoked_at)),
        revoked_reason=None if reason is None else str(reason),
        last_used_at=None if last_used is None else int(str(last_used)),
        root=None if root is None else str(root), rotated_from=None if rotated_from is None else str(rotated_from),
        chain=() if chain is None else tuple(tuple(level) for level in json.loads(str(chain))),
    )
