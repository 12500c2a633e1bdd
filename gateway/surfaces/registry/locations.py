"""The upstream registry's answer headers that name URLs, made to point back at the gateway.

An upload is a conversation: `POST /v2/<app>/blobs/uploads/` answers `Location:
/v2/<app>/blobs/uploads/<id>?_state=...` (absolute to the upstream's host, or to the host the
gateway forwarded as X-Forwarded-Host), and the client sends every next chunk there. If that
reached the client unchanged it would talk to the upstream directly, without the gateway and
with no credential that works there; so every Location on the registry's own URLs becomes a
gateway-relative one (docker, skopeo, buildah and crane resolve it against the URL they asked),
and an upload Location must name the repository the request was authorized for. The upload id
it carries is returned so the surface can bind it to that repository (surface.py).

A Location to any other host (a blob GET redirected to the registry's object storage, with a
signed URL) is a download the client makes without any credential of ours: it is relayed as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.errors import UpstreamUnavailable
from gateway.surfaces.registry.requests import UPLOAD_ID, RegistryRequest

_OWN_PATH = re.compile(rb"/v2/(?P<repo>[a-z0-9][a-z0-9-]{0,62})/(?:blobs/uploads/(?P<upload>" + UPLOAD_ID
                       + rb")|blobs/[a-z0-9.+_-]+:[a-zA-Z0-9=_-]+|manifests/[A-Za-z0-9_.:=+-]+)")


@dataclass(frozen=True, slots=True)
class Rewritten:
    headers: list[tuple[bytes, bytes]]
    upload_id: str | None  # the upload a Location continues, to bind to the request's repository


def rewrite(headers: list[tuple[bytes, bytes]], request: RegistryRequest, *, upstream_base: str,
            forwarded_host: str) -> Rewritten:
    """`headers` with Location and Link made gateway-relative; raises UpstreamUnavailable (nothing
    relayed) for a Location on the registry's hosts that is not one of this repository's URLs."""
    own_hosts = {urlsplit(upstream_base).netloc.lower(), forwarded_host.lower()} - {""}
    base_path = urlsplit(upstream_base).path.rstrip("/")
    out: list[tuple[bytes, bytes]] = []
    upload_id = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"location":
            value, found = _location(value, request, own_hosts, base_path)
            upload_id = found or upload_id
        elif lowered == b"link":
            value = _link(value, upstream_base)
        out.append((name, value))
    return Rewritten(out, upload_id)


def _location(value: bytes, request: RegistryRequest, own_hosts: set[str], base_path: str) -> tuple[bytes, str | None]:
    text = value.decode("latin-1").strip()
    parts = urlsplit(text)
    if parts.netloc and parts.netloc.lower() not in own_hosts:
        if request.kind in ("upload_start", "upload"):
            raise UpstreamUnavailable("the upstream registry sent the upload to another host; it is not relayed")
        return value, None  # object storage: a signed download URL, no credential of ours
    path = parts.path
    if base_path and path.startswith(base_path + "/v2/"):
        path = path[len(base_path):]
    match = _OWN_PATH.fullmatch(path.encode("latin-1"))
    if match is None or match.group("repo").decode("ascii") != request.repo:
        raise UpstreamUnavailable("the upstream registry answered with a location outside the repository; "
                                  "it is not relayed")
    upload = match.group("upload")
    relative = path + (f"?{parts.query}" if parts.query else "")
    return relative.encode("latin-1"), upload.decode("ascii") if upload else None


def _link(value: bytes, upstream_base: str) -> bytes:
    """`Link: <https://upstream/v2/...>; rel="next"` (tags pages) -> `</v2/...>; rel="next"`."""
    marker = f"<{upstream_base.rstrip('/')}/".encode("latin-1")
    return value.replace(marker, b"</")
