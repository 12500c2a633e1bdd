"""Request-target canonicalization: one meaning per path, or a 400.

The gateway authorizes a path and forwards exactly the same bytes, so a target that could mean
two things to two parsers is refused before any matching (DESIGN section 6): absolute-form
targets, fragments, dot segments, `//`, a trailing `/`, `;` parameters, backslashes, NUL and
control bytes, non-ASCII bytes, percent-encoded `/`, `\\`, `.`, `%` (double encoding) and
control characters, and percent-encoded characters that have a plain spelling (letters,
digits, `-`, `_`, `~`), which would only serve to hide an app name. What remains decodes the
same way everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.errors import BadRequest

MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 8192
# Printable ASCII except space, `\`, `;` and `#`; `%` is checked separately.
_PATH_CHARS = re.compile(rb"[!$&'()*+,\-./0-9:=@A-Z\[\]^_`a-z{|}~%]*")
_QUERY_CHARS = re.compile(rb"[!$&'()*+,\-./0-9:;=?@A-Z\[\]^_`a-z{|}~%]*")
_PERCENT = re.compile(rb"%(.{0,2})", re.S)
_HEX2 = re.compile(rb"[0-9A-Fa-f]{2}")
_UNRESERVED = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # decoded, for matching
    raw_path: bytes  # forwarded byte for byte
    raw_query: bytes
    has_query: bool = False  # the target had a '?', even with nothing after it

    @property
    def forward_target(self) -> bytes:
        """What the upstream receives: the target as received, a bare trailing '?' included."""
        return self.raw_path + (b"?" + self.raw_query if self.has_query else b"")


def canonicalize(raw_path: bytes, raw_query: bytes, *, has_query: bool | None = None) -> Target:
    """The target `raw_path` + ('?' + `raw_query` when `has_query`, which defaults to a non-empty
    query), checked; raises BadRequest for anything that could be read two ways."""
    if not raw_path.startswith(b"/"):
        raise BadRequest("request target must be a path starting with '/' "
                         "(absolute-form and authority-form targets are refused)")
    if len(raw_path) > MAX_PATH_BYTES:
        raise BadRequest(f"path is longer than {MAX_PATH_BYTES} bytes")
    if len(raw_query) > MAX_QUERY_BYTES:
        raise BadRequest(f"query string is longer than {MAX_QUERY_BYTES} bytes")
    if b"#" in raw_path or b"#" in raw_query:
        raise BadRequest("request target carries a fragment ('#'); send the path without it")
    if b"\\" in raw_path:
        raise BadRequest("path contains a backslash; use '/' only")
    if b";" in raw_path:
        raise BadRequest("path contains ';' (path parameters are ambiguous); remove it")
    if not _PATH_CHARS.fullmatch(raw_path) or b"?" in raw_path:
        raise BadRequest("path contains a space, control, non-ASCII or reserved byte; percent-encode data or remove it")
    if raw_query and not _QUERY_CHARS.fullmatch(raw_query):
        raise BadRequest("query string contains a space, control or non-ASCII byte; percent-encode it")
    if b"//" in raw_path:
        raise BadRequest("path contains an empty segment ('//'); remove the extra slash")
    if raw_path != b"/" and raw_path.endswith(b"/"):
        raise BadRequest("path ends with '/'; remove the trailing slash")
    if b"%" in raw_path:
        _check_percent_escapes(raw_path, where="path")
    if b"%" in raw_query:
        _check_percent_escapes(raw_query, where="query string", strict=False)
    path = unquote(raw_path.decode("ascii"), errors="strict")
    for segment in path.split("/"):
        if segment in (".", ".."):
            raise BadRequest("path contains a dot segment ('.' or '..'); send the resolved path")
    return Target(path=path, raw_path=raw_path, raw_query=raw_query,
                  has_query=bool(raw_query) if has_query is None else has_query)


def _check_percent_escapes(raw: bytes, *, where: str, strict: bool = True) -> None:
    for match in _PERCENT.finditer(raw):
        digits = match.group(1)
        if not _HEX2.fullmatch(digits):
            raise BadRequest(f"{where} has a malformed percent-escape; use %XX with two hex digits")
        byte = int(digits, 16)
        if byte < 0x20 or byte == 0x7F:
            raise BadRequest(f"{where} encodes a control character (%{digits.decode().upper()})")
        if not strict:
            continue
        if byte == 0x25:
            raise BadRequest(f"{where} is double-encoded (%25); send it encoded once")
        if byte in (0x2F, 0x5C, 0x2E):
            raise BadRequest(f"path encodes '/', '\\' or '.' (%{digits.decode().upper()}); "
                             "these are ambiguous, send them plainly or not at all")
        if byte in _UNRESERVED:
            raise BadRequest(f"path percent-encodes a plain character (%{digits.decode().upper()}); spell it plainly")
        if byte >= 0x80:
            raise BadRequest("path encodes non-ASCII bytes; Fly names are ASCII")
