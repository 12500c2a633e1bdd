"""What a Distribution API request asks for: its kind, the repository (= the app) it names, the
action that needs, and the few query parameters the API defines.

Parsing is strict and works on the bytes as received: a repository must be one Fly app name
(so `a/b`, percent-encoding or dot segments never match), a reference a tag or a digest, and the
query may carry only the keys its endpoint defines, each once. Anything else is refused before
anything is forwarded, so the upstream registry reads exactly the target the gateway authorized.
The catalog (`/v2/_catalog`) is refused: it lists every app's repository, and a filtered, paged
catalog would still tell a token which apps exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from gateway.errors import GatewayError, Unauthenticated

PULL, PUSH, DELETE = "images:pull", "images:push", "images:delete"
ACTIONS = (PULL, PUSH, DELETE)

_REPO = rb"(?P<repo>[a-z0-9][a-z0-9-]{0,62})"  # a Fly app name (gateway/core/grants.py APP_NAME)
_DIGEST = rb"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{1,256}"
_TAG = rb"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
UPLOAD_ID = rb"[A-Za-z0-9][A-Za-z0-9_.=-]{0,255}"
_PATHS: list[tuple[str, re.Pattern[bytes]]] = [
    ("manifest", re.compile(rb"/v2/" + _REPO + rb"/manifests/(?:" + _TAG + rb"|" + _DIGEST + rb")")),
    ("upload_start", re.compile(rb"/v2/" + _REPO + rb"/blobs/uploads/")),
    ("upload", re.compile(rb"/v2/" + _REPO + rb"/blobs/uploads/(?P<upload>" + UPLOAD_ID + rb")")),
    ("blob", re.compile(rb"/v2/" + _REPO + rb"/blobs/" + _DIGEST)),
    ("tags", re.compile(rb"/v2/" + _REPO + rb"/tags/list")),
]
# kind -> method -> action
_ACTIONS: dict[str, dict[str, str]] = {
    "manifest": {"GET": PULL, "HEAD": PULL, "PUT": PUSH, "DELETE": DELETE},
    "blob": {"GET": PULL, "HEAD": PULL, "DELETE": DELETE},
    "upload_start": {"POST": PUSH},
    "upload": {"GET": PUSH, "PATCH": PUSH, "PUT": PUSH, "DELETE": PUSH},
    "tags": {"GET": PULL},
}
# kind -> query keys it may carry
_QUERY: dict[str, frozenset[str]] = {
    "manifest": frozenset(), "blob": frozenset(), "upload_start": frozenset({"digest", "mount", "from"}),
    "upload": frozenset({"_state", "digest"}), "tags": frozenset({"n", "last"}),
}
_QUERY_VALUE = re.compile(rb"[A-Za-z0-9._~%+=:-]*")
_APP = re.compile(_REPO.replace(b"(?P<repo>", b"(?:"))
_DIGEST_TEXT = re.compile(_DIGEST.decode())


class RegistryRefusal(GatewayError):
    """A refusal with its Distribution error code (what docker, skopeo and crane print)."""

    def __init__(self, status: int, code: str, registry_code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.registry_code = registry_code


def unknown(message: str) -> RegistryRefusal:
    return RegistryRefusal(404, "unknown_route", "NAME_UNKNOWN", message)


def denied(message: str) -> RegistryRefusal:
    return RegistryRefusal(403, "forbidden", "DENIED", message)


@dataclass(frozen=True, slots=True)
class RegistryRequest:
    """One parsed request. `repo` is the app; `mount_from` the app a cross-repository mount reads."""

    kind: str  # base, manifest, blob, upload_start, upload, tags
    action: str | None = None  # None: `/v2/`, answered by the gateway
    repo: str | None = None
    upload_id: str | None = None
    mount_from: str | None = None

    @property
    def carries_blob(self) -> bool:
        """The body is (part of) a layer: streamed under limits.max_blob_bytes, not max_body_bytes."""
        return self.kind in ("upload_start", "upload")


def parse(method: str, raw_path: bytes, raw_query: bytes, has_query: bool) -> RegistryRequest:
    """The request `method raw_path?raw_query` asks for; raises RegistryRefusal (or Unauthenticated
    for a token in the query string)."""
    if raw_path in (b"/v2", b"/v2/"):
        if method not in ("GET", "HEAD") or has_query:
            raise unknown("the registry's base endpoint is GET /v2/ without a query")
        return RegistryRequest("base")
    if raw_path.startswith(b"/v2/_catalog"):
        raise denied("the catalog lists every app's repository; it is refused. "
                     "Ask for one repository's tags: GET /v2/<app>/tags/list")
    found = next(((kind, match) for kind, pattern in _PATHS if (match := pattern.fullmatch(raw_path))), None)
    if found is None:
        raise unknown("no Distribution API endpoint of this gateway has this path; "
                      "a repository is one Fly app name (registry.fly.io/<app>)")
    kind, match = found
    action = _ACTIONS[kind].get(method)
    if action is None:
        raise RegistryRefusal(405, "unknown_route", "UNSUPPORTED",
                              f"{method} is not an operation of this endpoint; allowed: {', '.join(_ACTIONS[kind])}")
    query = parse_query(raw_query, has_query, _QUERY[kind])
    repo = match.group("repo").decode("ascii")
    upload = match.group("upload").decode("ascii") if kind == "upload" else None
    if kind == "upload" and "digest" in query and method != "PUT":
        raise RegistryRefusal(400, "bad_request", "UNSUPPORTED", "digest= closes an upload: only with PUT")
    mount_from = None
    if "mount" in query or "from" in query:
        mount_from, digest = query.get("from", ""), query.get("mount", "")
        if not _APP.fullmatch(mount_from.encode()) or not _DIGEST_TEXT.fullmatch(digest) or "digest" in query:
            raise RegistryRefusal(400, "bad_request", "UNSUPPORTED",
                                  "a cross-repository mount is ?mount=<digest>&from=<app>, both given, nothing else")
    return RegistryRequest(kind, action, repo, upload, mount_from)


def parse_query(raw_query: bytes, has_query: bool, allowed: frozenset[str]) -> dict[str, str]:
    """The query's values (decoded as the upstream's Go server decodes them), each key once."""
    if not has_query:
        return {}
    if not allowed:
        raise RegistryRefusal(400, "bad_request", "UNSUPPORTED", "this endpoint takes no query string")
    values: dict[str, str] = {}
    for part in raw_query.split(b"&"):
        key, sep, value = part.partition(b"=")
        name = key.decode("ascii", errors="replace")
        if not sep or name not in allowed or name in values or not _QUERY_VALUE.fullmatch(value):
            raise RegistryRefusal(400, "bad_request", "UNSUPPORTED",
                                  f"the query may carry only {', '.join(sorted(allowed))}, each once, URL-encoded")
        values[name] = unquote_plus(value.decode("ascii"))
    if any("sgt_" in value.lower() for value in values.values()):
        raise Unauthenticated("tokens in the query string are refused; log in with docker login -u x -p sgt_...")
    return values


def describe(request: RegistryRequest) -> dict[str, Any] | None:
    """Audit detail beyond action and app: the mount's source repository."""
    return {"mount_from": request.mount_from} if request.mount_from else None
