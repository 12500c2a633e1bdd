"""The sandbox's stand-in for Fly's token checks, for `upstream.attenuate: apps`.

The sandbox holds a root key and issues the gateway's upstream macaroon (`issue`). Every request
must then carry a macaroon minted from that key (`FlyV1 fm2_...`, or Bearer on the Machines API)
whose caveats permit it, checked the way Fly checks them (superfly/macaroon `flyio` caveats):

- the signature chain verifies under the root key;
- every `ValidityWindow` contains now;
- every `Apps` caveat names the request's app (by its numeric id) with the action bits the
  method needs (GET/HEAD read, DELETE delete, others write); an `Apps` caveat on a request that
  names no app is refused, as Fly refuses an unspecified resource;
- a `Mutations` caveat allows only GraphQL bodies that run nothing but the mutations it names;
- any other caveat type is refused (the sandbox does not know it, so it cannot say it permits).

The request's app is the one in its path (`/v1/apps/{app}/...`, `/api/v1/apps/{app}/...`), the app
a release belongs to (`/api/v1/releases/{id}`), or the JSON body's `app_name` (REST builds and
releases). A refusal is 401 naming the failed caveat, so a
gateway that forwarded a request for another app than it authorized fails loudly in tests.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    parse,
)
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.upstream import macaroon
from gateway.upstream.macaroon import Caveat, MacaroonError

_APP_PATH = re.compile(r"^(?:/api)?/v1/apps/([^/]+)")
_RELEASE_PATH = re.compile(r"^/api/v1/releases/([^/]+)$")
_NEEDS = {"GET": macaroon.READ, "HEAD": macaroon.READ, "DELETE": macaroon.DELETE}
LOCATION = "https://api.fly.io/"


def new_root_key() -> bytes:
    return os.urandom(32)


def issue(key: bytes) -> str:
    """The upstream macaroon the sandbox hands the gateway: an org token with no caveats."""
    return macaroon.encode(macaroon.mint(key, os.urandom(8), LOCATION))


class RequireMacaroon:
    """ASGI middleware: refuses (401) what the presented macaroon does not permit."""

    def __init__(self, app: ASGIApp, key: bytes, numeric_id: Callable[[str], int | None],
                 release_app: Callable[[str], str | None] = lambda _: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.app, self.key, self.numeric_id, self.clock = app, key, numeric_id, clock
        self.release_app = release_app  # the app a release id belongs to, as Fly knows it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = b""
        if scope["method"] not in ("GET", "HEAD", "DELETE"):
            body, receive = await _buffered(receive)
        problem = self.problem(scope, body)
        if problem is not None:
            await JSONResponse({"error": f"unauthorized: {problem}"}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def problem(self, scope: Scope, body: bytes) -> str | None:
        supplied = Headers(scope=scope).getlist("authorization")
        if len(supplied) != 1:
            return "send exactly one Authorization header"
        scheme, _, token = supplied[0].partition(" ")
        if scheme.lower() not in ("flyv1", "bearer"):
            return "the Authorization scheme must be FlyV1 (or Bearer)"
        try:
            caveats = macaroon.verify(macaroon.decode(token.strip()), self.key)
        except MacaroonError as exc:
            return str(exc)
        release = _RELEASE_PATH.match(scope["path"])
        app = self.release_app(release.group(1)) if release else _app_of(scope["path"], body)
        for item in caveats:
            why = self._refuses(item, scope, app, body)
            if why is not None:
                return why
        return None

    def _refuses(self, item: Caveat, scope: Scope, app: str | None, body: bytes) -> str | None:
        if not _well_formed(item):
            return f"caveat type {item.type} has a body the sandbox cannot read"
        if item.type == macaroon.VALIDITY_WINDOW:
            not_before, not_after = item.body
            now = self.clock()
            return None if not_before <= now <= not_after else "the token's validity window does not contain now"
        if item.type == macaroon.APPS:
            if app is None:
                return "the token is confined to apps, and this request names none"
            number = self.numeric_id(app)
            permitted = item.body[0].get(number) if number is not None else None
            if permitted is None:
                return f"the token's Apps caveat does not include app {app}"
            needed = _NEEDS.get(scope["method"], macaroon.WRITE)
            if permitted & needed != needed:
                return f"the token's Apps caveat does not allow {scope['method']} on app {app}"
            return None
        if item.type == macaroon.MUTATIONS:
            asked = _graphql_mutations(body) if scope["path"] == "/graphql" else None
            if asked is None:
                return "the token is confined to GraphQL mutations, and this request runs something else"
            allowed = set(item.body[0])
            outside = [name for name in asked if name not in allowed]
            return f"the token's Mutations caveat does not allow {', '.join(outside)}" if outside else None
        return f"caveat type {item.type} is not one the sandbox can check"


def _well_formed(item: Caveat) -> bool:
    body = item.body
    if item.type == macaroon.VALIDITY_WINDOW:
        return isinstance(body, list) and len(body) == 2 and all(isinstance(v, int) for v in body)
    if item.type == macaroon.APPS:
        return (isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict)
                and all(isinstance(k, int) and isinstance(v, int) for k, v in body[0].items()))
    if item.type == macaroon.MUTATIONS:
        return (isinstance(body, list) and len(body) == 1 and isinstance(body[0], list)
                and all(isinstance(name, str) for name in body[0]))
    return True


def _graphql_mutations(body: bytes) -> list[str] | None:
    """The mutation fields a GraphQL body (one request or a batch) runs, through fragments; None if
    it runs anything else."""
    try:
        document = json.loads(body)
        requests = document if isinstance(document, list) else [document]
        names: list[str] = []
        for request in requests:
            definitions = parse(request["query"]).definitions
            fragments = {d.name.value: d for d in definitions if isinstance(d, FragmentDefinitionNode)}
            for definition in definitions:
                if not isinstance(definition, OperationDefinitionNode):
                    continue
                if definition.operation != OperationType.MUTATION:
                    return None
                names += _root_fields(definition.selection_set.selections, fragments)
        return names
    except (ValueError, KeyError, TypeError, GraphQLError):
        return None


def _root_fields(selections: Any, fragments: dict[str, FragmentDefinitionNode]) -> list[str]:
    names: list[str] = []
    for selection in selections:
        if isinstance(selection, FieldNode):
            names.append(selection.name.value)
        elif isinstance(selection, FragmentSpreadNode):
            fragment = fragments.get(selection.name.value)
            if fragment is None:
                raise KeyError(selection.name.value)
            names += _root_fields(fragment.selection_set.selections, fragments)
        elif isinstance(selection, InlineFragmentNode):
            names += _root_fields(selection.selection_set.selections, fragments)
    return names


def _app_of(path: str, body: bytes) -> str | None:
    match = _APP_PATH.match(path)
    if match:
        return match.group(1)
    try:
        document = json.loads(body) if body else None
    except ValueError:
        return None
    name = document.get("app_name") if isinstance(document, dict) else None
    return name if isinstance(name, str) else None


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """The whole request body, and a `receive` that hands it on again."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: Message = await receive()
        return message

    return body, replay


def numeric_ids(state: Any) -> Callable[[str], int | None]:
    """The sandbox apps' numeric ids, by name (`SandboxState.apps`)."""
    def lookup(name: str) -> int | None:
        app = state.apps.get(name)
        return None if app is None else int(app.internal_numeric_id)

    return lookup


def release_apps(state: Any) -> Callable[[str], str | None]:
    """The app each sandbox release belongs to, by release id."""
    def lookup(release_id: str) -> str | None:
        return next((app.name for app in state.apps.values()
                     if any(release.get("id") == release_id for release in app.releases)), None)

    return lookup
