"""Reading a JSON request body the way the upstream will.

The gateway inspects some bodies (the app name of `POST /v1/apps`, constrained machine
configs) and forwards them unchanged, so it must read them as the upstream does. Fly's API is
Go: `encoding/json` matches keys to fields case-insensitively and takes every duplicate, where
Python keeps only the last exact-case key. A body whose meaning differs between the two is
refused: keys that are equal after case folding, at any depth, are a 400. Keys come back case
folded, so lookups use lowercase names. NaN and Infinity, which Go rejects, are refused too.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import BadRequest


def load_strict(raw: bytes | None, what: str = "the request body") -> Any:
    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        folded: dict[str, Any] = {}
        for key, value in pairs:
            name = key.casefold()
            if name in folded:
                raise BadRequest(f"{what} has the key {key!r} more than once (keys that differ only in case "
                                 "count as the same, as the upstream reads them); send it once")
            folded[name] = value
        return folded

    def no_constants(name: str) -> Any:
        raise BadRequest(f"{what} contains {name}, which is not JSON")

    try:
        return json.loads(raw or b"", object_pairs_hook=pairs_hook, parse_constant=no_constants)
    except RecursionError:
        raise BadRequest(f"{what} nests JSON too deeply") from None
    except ValueError:
        raise BadRequest(f"{what} is not valid JSON") from None
