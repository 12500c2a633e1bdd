"""`GET /_gateway/v1/audit`: recent audit records, filtered, for token-admins (`scopegate audit
tail|export` in remote mode).

Where the records come from: the first `file:` sink when the config has one (every worker and
restart writes there), else the records this process keeps in memory (the newest
`core.audit.RECENT`; a stdout-only gateway, like the Docker image's default, cannot read its own
stdout back). The answer says which (`source`), so a partial view is never mistaken for the whole.
A file is read through on every call (in a thread, off the event loop): keep it rotated by the
log shipper that forwards it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.endpoint import Handler
from gateway.core.audit import RECENT, AuditRecord
from gateway.core.audit_query import MAX_LIMIT, AuditQuery, parse_since
from gateway.core.audit_sinks import file_sink_path
from gateway.core.tokens import Claims
from gateway.errors import BadRequest, StateUnavailable
from gateway.services import Services

PARAMETERS = ("since", "app", "decision", "token", "limit")
DEFAULT_LIMIT = 100


def query_from(request: Request) -> AuditQuery:
    params = request.query_params
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; known: {', '.join(PARAMETERS)}")
    try:
        limit = int(params.get("limit", DEFAULT_LIMIT))
    except ValueError:
        raise BadRequest(f"limit {params['limit']!r} is not a number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit {limit} is out of range: give 1 to {MAX_LIMIT}")
    try:
        since = parse_since(params["since"]) if params.get("since") else None
        return AuditQuery(since=since, app=params.get("app") or None, decision=params.get("decision") or None,
                          token=params.get("token") or None, limit=limit)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _read(path: Path, query: AuditQuery) -> list[str]:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return query.select(handle)
    except FileNotFoundError:
        return []


def audit_endpoint(services: Services) -> Handler:
    config = services.config

    async def run(request: Request, claims: Claims, record: AuditRecord) -> Response:
        query = query_from(request)
        path = file_sink_path(config.audit_sinks, config.base_dir)
        if path is not None:
            services.audit.flush()  # what this process has queued belongs in the answer
            try:
                lines = await asyncio.to_thread(_read, path, query)
            except OSError as exc:
                raise StateUnavailable(f"the audit file cannot be read ({exc.__class__.__name__})") from None
            source, note = "file", "every record the file sink holds"
        else:
            lines = query.select(services.audit.recent_lines())
            source = "memory"
            note = (f"no file sink is configured: the newest {RECENT} records of the gateway process that "
                    "answered; with several workers or instances add a file or redis sink to audit.sinks")
        record.reason = f"read {len(lines)} audit records ({source})"
        return JSONResponse({"records": [json.loads(line) for line in lines], "source": source, "note": note})

    return run
