"""Refusals of the token exchange, in the RFC 6749 section 5.2 shape.

Shared by the exchange (oidc.py) and the issuers' key cache (oidc_keys.py), which both refuse
id tokens; kept apart so neither has to import the other for them.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# At most one JWKS fetch per issuer per this many seconds (also a 503's Retry-After).
REFETCH_INTERVAL_S = 30

class ExchangeError(Exception):
    """A refusal in the RFC 6749 section 5.2 shape. `description` goes to the client; `detail`
    (more, e.g. each rule's reason) only to the audit log."""

    def __init__(self, code: str, description: str, *, status: int = 400, detail: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s

    def response(self, request_id: str) -> JSONResponse:
        headers = {**NO_STORE, "x-request-id": request_id}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, self.retry_after_s))
        return JSONResponse({"error": self.code, "error_description": self.description}, status_code=self.status,
                            headers=headers)


NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def invalid_request(description: str) -> ExchangeError:
    return ExchangeError("invalid_request", description, status=400)


def invalid_grant(description: str, *, detail: str | None = None) -> ExchangeError:
    # The subject token is the credential of this endpoint: refusing it is an authentication failure.
    return ExchangeError("invalid_grant", description, status=401, detail=detail)


def unavailable(description: str, retry_after_s: int = REFETCH_INTERVAL_S) -> ExchangeError:
    return ExchangeError("temporarily_unavailable", description, status=503, retry_after_s=retry_after_s)
