"""`POST /_gateway/v1/token/exchange` (RFC 8693): a CI job's OIDC id token for a short-lived token.

Not bearer-authenticated (the subject token is the credential); audited like every admin
operation, with the issuer, the trust rules that matched and the job's key claims added.
Refusals come in the RFC 6749 section 5.2 shape (`{"error", "error_description"}`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.endpoint import open_frame
from gateway.errors import GatewayError
from gateway.oidc.errors import NO_STORE, ExchangeError, invalid_grant, invalid_request
from gateway.oidc.exchange import MAX_FORM_BYTES, parse_form
from gateway.services import Services


def exchange_endpoint(services: Services) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        frame = open_frame(services, request, "gateway:exchange")
        record = frame.record
        record.extra = {"rule": None, "issuer": None, "claims": None}

        async def work() -> Response:
            if request.url.query:
                raise invalid_request("send the parameters in the form body, never in the query string")
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/x-www-form-urlencoded":
                raise invalid_request("send the request as application/x-www-form-urlencoded (RFC 8693)")
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    raise invalid_request(f"the body is larger than {MAX_FORM_BYTES} bytes")
            if services.exchanger is None:
                raise invalid_grant("this gateway trusts no OIDC issuer (oidc.trust is empty)")
            assert record.extra is not None
            result = await services.exchanger.exchange(parse_form(body), record.extra)
            record.decision, record.status = "allow", 200
            record.jti, record.sub, record.token_name = result.jti, result.subject, result.name
            record.reason = (f"minted {result.jti} ({', '.join(result.grants)}) for {result.expires_in}s "
                             f"by trust rule(s) {', '.join(result.rules)}")
            return JSONResponse(result.body(), headers={**NO_STORE, "x-request-id": frame.request_id})

        async def refuse(error: GatewayError) -> Response:
            if not isinstance(error, ExchangeError):  # fail closed, and say so in the RFC shape
                error = ExchangeError("server_error", "the exchange failed inside the gateway; nothing was minted",
                                      status=500)
                record.status = error.status  # the record says what the client got
            return JSONResponse(error.body(), status_code=error.status,
                                headers={**error.headers, "x-request-id": frame.request_id})

        return await frame.run(work, refuse)

    return run
