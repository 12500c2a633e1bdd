"""Audit records for admin actions the CLI takes in local mode (on the store and keyring directly).

The admin API audits every operation through its request frame; a command that works on the
store itself (mint, revoke, rotate, attenuate, `init`, `keys rotate|retire`) writes the same
`AuditRecord`, with the same encoder, to the same `audit.sinks` of the config, so an admin action
leaves one line whichever way it was made. Reads (`token list|show`) are not audited locally:
whoever can run them can read the store file anyway.

How a local record differs from the API's: the actor is the operator, `sub` = `local:<user>`
(the login name of the process; no token was presented, so `jti` and `token_name` are null,
except for `token attenuate`, where they name the token narrowed, as the API's record does),
`client_ip` is `local`, `method` is `CLI` and `path` the command (`scopegate token mint`), never
its arguments. `action`, `reason` and `status` are what the admin API would have written for the
same operation (201 minted, 204 revoked, 200 for key changes; a refusal is `deny` with its status).
A sink that cannot be opened stops the action before anything changes (fail closed).

The `stdout` sink belongs to the gateway process, whose stdout a log collector reads; a CLI's
stdout is its output (`TOKEN=$(scopegate token mint ...)`), so there the stdout sink writes to
stderr instead.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.cli.common import current_user
from gateway.config import Config
from gateway.core.audit import AuditLog, AuditRecord
from gateway.core.audit_sinks import Sink, StreamSink, sinks_from_config
from gateway.errors import ConfigError, GatewayError
from gateway.store import TokenStore

CLIENT = "local"
METHOD = "CLI"


def operator() -> str:
    """Who acts in local mode: `local:<login name>`."""
    return f"local:{current_user()}"


class LocalAudit:
    """The config's sinks, opened at the first audited action (a read-only command opens none)."""

    def __init__(self, config: Config, store: TokenStore | None) -> None:
        self.config = config
        self.store = store
        self.log: AuditLog | None = None

    @classmethod
    def open(cls, config: Config, store: TokenStore | None = None) -> LocalAudit:
        return cls(config, store)

    def _open_log(self) -> AuditLog:
        if self.log is None:
            config, redis = self.config, None
            if "redis" in config.audit_sinks and self.store is not None:
                sink = self.store.audit_sink(config.audit_redis_maxlen)
                redis = None if sink is None else (lambda: sink)
            try:
                opened = sinks_from_config(config.audit_sinks, config.base_dir, redis_sink=redis)
            except OSError as exc:
                # Fail closed: an admin action that cannot be audited is not taken.
                raise ConfigError(f"the audit sink {exc.filename or ''} cannot be opened ({exc.strerror}); nothing "
                                  "was changed. Run as a user that may write it, or point audit.sinks elsewhere "
                                  f"({config.source})") from None
            sinks: list[Sink] = [StreamSink(sys.stderr) if isinstance(s, StreamSink) and s.stream is sys.stdout
                                 else s for s in opened]
            self.log = AuditLog(sinks)
        return self.log

    @asynccontextmanager
    async def action(self, action: str, command: str) -> AsyncIterator[AuditRecord]:
        """Audit the admin action done in the `async with` body: allowed when the body completes
        (it sets `reason` and `status`), denied with the error's status when it raises."""
        log = self._open_log()
        record = AuditRecord(os.urandom(16).hex(), CLIENT, METHOD, f"scopegate {command}", action,
                             sub=operator())
        started = time.perf_counter()
        try:
            yield record
            record.decision = "allow"
        except GatewayError as error:
            record.deny(error.status, error.audit_reason)
            raise
        except ConfigError as error:
            record.deny(400, str(error))
            raise
        except BaseException:
            record.deny(500, "internal_error")
            raise
        finally:
            record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
            log.emit(record)

    async def close(self) -> None:
        if self.log is not None:
            await self.log.drain()
            self.log.close()
