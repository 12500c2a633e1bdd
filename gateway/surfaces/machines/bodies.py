"""What a Machines API request body may say, read the way the upstream (a Go service) reads it.

Every Machines API operation that takes a body takes JSON (the spec says so for all of them).
The gateway reads a body whole before anything is forwarded, never streams it, so the upstream
sees a request only once the gateway has judged all of it, and a body that stalls or breaks the
limit is refused with nothing forwarded. Then:

- a route that takes no body (GET, DELETE, and the POSTs the spec gives none) refuses one;
- the body must be strict JSON (core/jsonbody.py: UTF-8, no duplicate keys, no NaN, bounded
  nesting), whatever the route;
- a body a request-shape constraint judges may hold only its route's schema fields (`fields` in
  the route map): the constraint reads the fields it knows, and a field it does not (a second
  spelling, a field added upstream later) could be the one the upstream acts on. Both spellings
  of exec's command (`cmd` and `command`) are refused together for the same reason;
- `org_slug` must name the gateway's own organization (`upstream.org_slug`), and `network` (a
  custom private network, which an app shares with the apps already on it) is accepted only as
  the default one (absent, empty or `default`): apps created through the gateway land in the
  organization's default network.
"""

from __future__ import annotations

from typing import Any

from gateway.core.jsonbody import load_strict
from gateway.errors import BadRequest, Forbidden
from gateway.surfaces.routes import Route

# How a body names the organization's default network: not at all, empty, or as the upstream
# itself names it in its answers (`"network": "default"`).
_DEFAULT_NETWORK = (None, "", "default")
# Fields that are one setting spelled two ways: the upstream picks one, the constraint must not guess which.
_ALIASES = (("cmd", "command"),)


def refuse_unexpected_body(route: Route, has_body: bool) -> None:
    if has_body and not route.takes_body:
        raise BadRequest(f"{route.method} {route.path} takes no body; send the request without one")


def read_document(route: Route, body: bytes, *, judged: bool) -> Any:
    """The body's JSON value; where a constraint judges it (`judged`), only the fields it can judge."""
    what = f"the body of {route.method} {route.path}"
    document = load_strict(body, what, fold=True)
    if not judged:
        return document
    if not isinstance(document, dict):
        raise BadRequest(f"{what} must be a JSON object: a request-shape constraint applies to it")
    if route.fields is None:
        raise Forbidden(f"a request-shape constraint applies to {route.method} {route.path}, but the route map "
                        "does not list the fields of its body, so the constraint cannot judge it")
    unknown = sorted(set(document) - route.fields)
    if unknown:
        raise BadRequest(f"{what} has field(s) {', '.join(unknown)} that a request-shape constraint cannot judge; "
                         f"send only {', '.join(sorted(route.fields))}")
    for spellings in _ALIASES:
        given = [name for name in spellings if document.get(name) is not None]
        if len(given) > 1:
            raise BadRequest(f"{what} gives both {' and '.join(given)}; the upstream reads only one of them, "
                             f"so send {spellings[-1]!r} alone")
    return document


def check_placement(document: Any, org_slug: str | None) -> None:
    """A body that places something in an organization or network (`POST /v1/apps`) keeps it in ours."""
    if not isinstance(document, dict):
        return
    org = document.get("org_slug")
    if org is not None and org != org_slug:
        served = f" ({org_slug})" if org_slug else " (upstream.org_slug is not set)"
        raise Forbidden(f"field 'org_slug' names organization {org!r}, not the one this gateway serves{served}; "
                        "leave it out or name that organization")
    network = document.get("network")
    if network not in _DEFAULT_NETWORK:
        raise Forbidden(f"field 'network' ({network!r}) is not accepted through the gateway: an app in a custom "
                        "network reaches the other apps on it; leave it out (the organization's default network)")
