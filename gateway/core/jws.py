"""The parts of a compact JWS (`header.payload.signature`, base64url), read strictly.

One spelling per token: a segment is accepted only in its one canonical base64url form (no
padding, no other alphabet, no non-zero padding bits), and JSON only as UTF-8 objects in which
no name appears twice. pyjwt accepts padding, and json.loads keeps the last of two equal names
(another parser may keep the first); a token whose meaning depends on the parser is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from gateway.errors import Unauthenticated


def segment(text: str) -> bytes | None:
    """A base64url segment's bytes, only when `text` is their one canonical spelling."""
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != text.encode("ascii"):
        return None
    return decoded


def segment_json(text: str) -> dict[str, Any] | None:
    """A JSON object segment; a name given twice refuses the token (json.loads keeps the last of
    two equal keys, another parser may keep the first: a token whose meaning depends on the
    parser is refused)."""
    decoded = segment(text)
    if decoded is None:
        return None
    try:  # UTF-8 only (json.loads of bytes would also take UTF-16 and UTF-32)
        value = json.loads(decoded.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise Unauthenticated("token has a claim or header field twice; it was not minted by this gateway")
    return result
