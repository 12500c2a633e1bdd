"""Reading a JSON request body the way the upstream will, or refusing it.

The gateway inspects some bodies (the app name of `POST /v1/apps`, constrained machine configs,
GraphQL documents, REST bodies) and forwards them unchanged, so it must read them as the
upstream does. Where two readers could disagree, the body is refused with a 400 that names the
problem; one strict reader serves every surface:

- UTF-8 only, no byte order mark (Python's `json.loads(bytes)` would also guess UTF-16 or UTF-32;
  Go replaces invalid UTF-8 with U+FFFD), no lone surrogate escape (`"\\ud800"`: Python keeps it,
  Go reads U+FFFD);
- no NaN or Infinity, and no number too large for a double (`1e400`: Python reads infinity, Go
  refuses it);
- no key twice in one object. Fly's Machines API is Go: `encoding/json` matches keys to struct
  fields case-insensitively and keeps the last of several, where Python keeps the last exact-case
  key; with `fold=True` keys that are equal after case folding count as the same and keys come
  back case folded (lookups use lowercase names). REST and GraphQL upstreams read keys exactly
  (`fold=False`);
- at most MAX_DEPTH nested arrays and objects.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from gateway.errors import BadRequest

MAX_DEPTH = 64
_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Refused(ValueError):
    """A problem the parser's hooks found; its text is the message's end."""


def _folded_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    folded: dict[str, Any] = {}
    for key, value in pairs:
        name = key.casefold()
        if name in folded:
            raise _Refused(f"has the key {key!r} twice (keys that differ only in case count as the "
                           "same, as the upstream reads them); send it once")
        folded[name] = value
    return folded


def _exact_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):  # rare: find which key, for the message
        keys = [key for key, _ in pairs]
        twice = next(key for key in keys if keys.count(key) > 1)
        raise _Refused(f"has the key {twice!r} twice; send it once")
    return document


def _no_constant(name: str) -> Any:
    raise _Refused(f"contains {name}, which is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"has the number {text[:40]}, too large for the upstream to read")
    return value


_FOLDED = json.JSONDecoder(object_pairs_hook=_folded_pairs, parse_constant=_no_constant, parse_float=_finite)
_EXACT = json.JSONDecoder(object_pairs_hook=_exact_pairs, parse_constant=_no_constant, parse_float=_finite)


def load_strict(raw: bytes | None, what: str = "the request body", *, fold: bool = True) -> Any:
    """The JSON value of `raw`; raises BadRequest naming what is wrong with it (`what` is its subject)."""
    raw = raw or b""
    if raw.startswith(_BOM):
        raise BadRequest(f"{what} starts with a byte order mark; send UTF-8 JSON without one")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not UTF-8 (byte {exc.start} is not valid); send UTF-8 JSON") from None
    try:
        value = (_FOLDED if fold else _EXACT).decode(text)
    except _Refused as exc:
        raise BadRequest(f"{what} {exc}") from None
    except RecursionError:
        raise BadRequest(f"{what} nests JSON too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc})") from None
    # Counting brackets is C-fast; only a body with many of them is walked for its depth.
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise BadRequest(f"{what} nests JSON too deeply (more than {MAX_DEPTH} levels)")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{what} has a lone surrogate escape (like \\ud800), which JSON readers read "
                             "differently; send whole characters") from None
    return value


def _depth(value: Any) -> int:
    """How deeply `value` nests arrays and objects (stops counting past MAX_DEPTH)."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            level.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest
