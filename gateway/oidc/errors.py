"""Refusals of the token exchange, in the RFC 6749 section 5.2 shape.

Shared by the exchange (exchange.py) and the issuers' key cache (keys.py), which both refuse
id tokens; kept apart so neither has to import the other for them. They are `GatewayError`s, so
the request frame audits them like any refusal; the exchange endpoint renders them in the RFC
shape (`body`, `headers`).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError

# At most one JWKS fetch per issuer per this many seconds (also a 503's Retry-After).
REFETCH_INTERVAL_S = 30

class ExchangeError(GatewayError):
    """A refusal in the RFC 6749 section 5.2 shape. `description` goes to the client; `detail`
    (more, e.g. each rule's reason) only to the audit log."""

    def __init__(self, code: str, description: str, *, status: int = 400, detail: str | None = None,
                 retry_after_s: int | None = None) -> None:
        headers = dict(NO_STORE)
        if retry_after_s is not None:
            headers["Retry-After"] = str(max(1, retry_after_s))
        super().__init__(description, headers=headers)
        self.code = code
        self.description = description
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s

    @property
    def audit_reason(self) -> str:
        return f"{self.code}: {self.description}" + (f" [{self.detail}]" if self.detail else "")

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}


NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def invalid_request(description: str) -> ExchangeError:
    return ExchangeError("invalid_request", description, status=400)


def invalid_grant(description: str, *, detail: str | None = None) -> ExchangeError:
    # The subject token is the credential of this endpoint: refusing it is an authentication failure.
    return ExchangeError("invalid_grant", description, status=401, detail=detail)


def unavailable(description: str, retry_after_s: int = REFETCH_INTERVAL_S) -> ExchangeError:
    return ExchangeError("temporarily_unavailable", description, status=503, retry_after_s=retry_after_s)
