"""One error tree for everything that ends a request early.

Each class carries the HTTP status and the stable `error` code of DESIGN section 11; one
renderer (`error_body`) turns any of them into the JSON body. Messages tell the user what to
do and never contain a secret: callers build them from names, never from token strings or
credentials.
"""

from __future__ import annotations

import re


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def audit_reason(self) -> str:
        """Why the request was refused, as the audit record says it."""
        return f"{self.code}: {self.message}"


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class Unauthenticated(GatewayError):
    status = 401
    code = "unauthenticated"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class UnknownRoute(GatewayError):
    status = 403
    code = "unknown_route"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class Unprocessable(GatewayError):
    """Well-formed request naming something unusable, e.g. a revoked token to explain."""

    status = 422
    code = "unprocessable"


class RequestTimeout(GatewayError):
    status = 408
    code = "request_timeout"


class TooLarge(GatewayError):
    status = 413
    code = "too_large"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class UpstreamUnavailable(GatewayError):
    status = 502
    code = "upstream_unavailable"


class StateUnavailable(GatewayError):
    status = 503
    code = "state_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "upstream_timeout"


class ConfigError(Exception):
    """A configuration, keyring or policy file that cannot be used; the CLI exits 2."""


# A token the client put where a name belongs (a path segment, a field) must not be echoed back
# or written to the audit log: it stays recognisable (`sgt_`) but its body is cut. A placeholder
# with no letter or digit after the prefix (`sgt_...` in "send 'Authorization: Bearer sgt_...'")
# carries nothing secret and is part of a hint the user needs, so it stays as it is.
TOKEN_TEXT = re.compile(r"sgt_(?=[A-Za-z0-9_\-.=%~+/]*[A-Za-z0-9])[A-Za-z0-9_\-.=%~+/]+")


def redact(text: str) -> str:
    return TOKEN_TEXT.sub("sgt_[redacted]", text) if "sgt_" in text else text


def error_body(error: GatewayError, request_id: str) -> dict[str, str]:
    return {"error": error.code, "message": redact(error.message), "request_id": request_id}
