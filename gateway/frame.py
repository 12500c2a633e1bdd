"""The request frame: what every request does around its own work, on every surface and endpoint.

A surface (Machines API, ...), the gateway's own API and the token exchange each do their own
work inside `RequestFrame.run`, which gives the request an id and a clock, an `AuditRecord` that
says "denied" until the work says otherwise, and on the way out, whatever happened:

- a `GatewayError` becomes the caller's rendering of it (JSON error body, GraphQL errors, RFC
  6749 body) and the record says why it was refused; once the work has begun forwarding
  (`forwarding()`), the upstream may have seen the request, so the record keeps its `allow` and
  says that forwarding did not complete (status, reason, `forwarded: incomplete`) instead of
  claiming a denial;
- any other exception is logged without detail, answered 500 and recorded as `internal_error`
  (fail closed: nothing is forwarded after it; the answer says whether it was forwarded before);
- the audit line is written and the request metrics observed, allowed or denied.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import unquote_to_bytes

from gateway.core.audit import AuditLog, AuditRecord
from gateway.core.tokens import Claims
from gateway.errors import GatewayError, StateUnavailable, Unauthenticated
from gateway.metrics import GatewayMetrics

log = logging.getLogger("scopegate")
T = TypeVar("T")


def refuse_tokens_in_query(raw_query: bytes) -> None:
    """Tokens travel in the Authorization header only: a query string naming one (however it is
    percent-encoded) is refused, on every surface and endpoint alike, before anything else."""
    if raw_query:
        query = unquote_to_bytes(raw_query).lower()
        if b"sgt_" in query or b"access_token" in query:
            raise Unauthenticated("tokens in the query string are refused; send 'Authorization: Bearer sgt_...'")


class RequestFrame:
    __slots__ = ("audit", "forwarded", "metrics", "record", "started")

    def __init__(self, audit: AuditLog, metrics: GatewayMetrics, *, client_ip: str, method: str, path: str,
                 action: str | None = None) -> None:
        self.started = time.perf_counter()
        self.audit = audit
        self.metrics = metrics
        # 128 random bits as 32 hex digits, like uuid4().hex, at a third of its cost.
        self.record = AuditRecord(os.urandom(16).hex(), client_ip, method, path, action)
        self.forwarded = False

    @property
    def request_id(self) -> str:
        return self.record.request_id

    def identify(self, claims: Claims) -> None:
        """The request is made with this token (the record names it, never its text)."""
        record = self.record
        record.jti, record.sub, record.token_name, record.who = claims.jti, claims.sub, claims.name, None

    def allow(self, reason: str) -> None:
        record = self.record
        record.decision, record.reason, record.what = "allow", reason, None

    def forwarding(self) -> None:
        """The request is about to go upstream: from here on a failure is not a denial."""
        self.forwarded = True

    def _fail(self, status: int, reason: str) -> None:
        record = self.record
        if self.forwarded and record.decision == "allow":
            record.status, record.what = status, None
            record.reason = f"{record.reason}; forwarding did not complete: {reason}"
            record.extra = {**(record.extra or {}), "forwarded": "incomplete"}
        else:
            record.deny(status, reason)

    async def run(self, work: Awaitable[T] | Callable[[], Awaitable[T]],
                  render: Callable[[GatewayError], Awaitable[T]]) -> T:
        """`work` (a coroutine, or what makes one), or `render(error)` when it fails; audited and
        measured either way."""
        try:
            return await (work if inspect.isawaitable(work) else work())
        except GatewayError as error:
            self._fail(error.status, error.audit_reason)
            if isinstance(error, StateUnavailable):
                self.metrics.store_failed()
            return await render(error)
        except Exception as exc:  # fail closed on anything unforeseen, and say nothing of it
            log.exception("request %s failed: %s", self.request_id, exc.__class__.__name__)
            self._fail(500, "internal_error")
            return await render(GatewayError(
                "the gateway failed on this request after forwarding it; check its result upstream before retrying"
                if self.forwarded else "the gateway failed on this request; it was not forwarded"))
        finally:
            self.close()

    def close(self) -> None:
        duration = time.perf_counter() - self.started
        record = self.record
        record.duration_ms = round(duration * 1000, 3)
        self.audit.emit(record)
        upstream_ms = record.upstream_ms
        self.metrics.observe(record.decision, record.action, record.status, duration,
                             None if upstream_ms is None else upstream_ms / 1000)
