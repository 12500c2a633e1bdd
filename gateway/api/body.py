"""Reading the admin API's JSON bodies: one object, bounded, every field checked by name and type."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from gateway.core.registry import MintedToken
from gateway.durations import parse_duration
from gateway.errors import BadRequest

MAX_ADMIN_BODY = 64 * 1024


async def json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY:
        raise BadRequest(f"request body is larger than {MAX_ADMIN_BODY} bytes")
    if not raw:
        return {}
    try:
        document = json.loads(raw)
    except ValueError:
        raise BadRequest("request body is not valid JSON; send a JSON object") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    for key, value in document.items():
        _check_text(value, key)
    return document


def _check_text(value: Any, where: str) -> None:
    # JSON can spell lone surrogates (\ud800) that no store, log or upstream can encode.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"field '{where}' contains text that is not valid Unicode") from None
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}")


def field(document: dict[str, Any], name: str, kind: type, *, required: bool = False) -> Any:
    if name not in document or document[name] is None:
        if required:
            raise BadRequest(f"field '{name}' is required")
        return None
    value = document[name]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise BadRequest(f"field '{name}' must be {'a string' if kind is str else kind.__name__}")
    return value


def duration_field(document: dict[str, Any], name: str, *, allow_zero: bool = False) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRequest(f"field '{name}' must be a duration like \"15m\", \"1h\", \"30d\" or whole seconds")
    try:
        return parse_duration(value, allow_zero=allow_zero)
    except ValueError as exc:
        raise BadRequest(f"field '{name}': {exc}") from None


def grants_field(document: dict[str, Any]) -> list[str]:
    grants = document.get("grants")
    if not isinstance(grants, list) or not grants or not all(isinstance(g, str) for g in grants):
        raise BadRequest("field 'grants' must be a non-empty list of strings like \"deployer@app:web-staging\"")
    return grants


def unknown_fields(document: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(document) - allowed)
    if extra:
        raise BadRequest(f"unknown field(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def minted_json(minted: MintedToken) -> dict[str, Any]:
    return {"token": minted.token, **minted.record.to_json()}
