"""`upstream.attenuate: apps`: every forwarded request carries the gateway's Fly macaroon narrowed
to that request, so Fly itself refuses what the gateway did not authorize (defence in depth).

For a request on an app the gateway appends `Apps{<numeric app id>: <actions>}` and a short
`ValidityWindow`; for an org-level request (no app: listing, `apps create`) only the window; for a
GraphQL body of mutations only, `Mutations{<their names>}` and the window. The
actions are read (`r`) for read-class actions and all (`rwcdC`) otherwise: Fly does not publish
which action bits each endpoint requires, and the point is the app. Numeric ids come from
`GET /v1/apps/{app}` (`internal_numeric_id`) on the Machines API and are kept for ten minutes (an
app deleted and re-created under its name gets a new id: a refused answer forgets it); narrowed
tokens are kept per (app id, actions) for a fifth of their window. docs/macaroons.md has the list
of what each surface forwards.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from gateway.errors import ConfigError, NotFound, UpstreamUnavailable
from gateway.upstream import macaroon
from gateway.upstream.macaroon import Macaroon, MacaroonError

_ID_TTL_S = 600
_SKEW_S = 60  # the window opens this much before now, for clocks behind ours
_READ_SUFFIXES = (":read", ":list", ":pull")
_LIMIT = 4096  # entries per cache; dropped whole when full

# (status, JSON body) of GET /v1/apps/{app}, asked with the gateway's own credential.
AppLookup = Callable[[str, str], Awaitable[tuple[int, object]]]


def root_macaroon(credential: str) -> Macaroon:
    """The gateway's upstream credential as a macaroon it can narrow; ConfigError saying why not."""
    text = credential.strip()
    if text.lower().startswith("flyv1 "):
        text = text[6:].strip()
    if "," in text:
        raise ConfigError("upstream.attenuate: apps needs one Fly macaroon as the upstream credential, not a "
                          "bundle with discharge tokens (FlyV1 a,b): use an org token without third-party "
                          "caveats (`fly tokens create org`), or set upstream.attenuate: none")
    try:
        root = macaroon.decode(text)
    except MacaroonError as exc:
        raise ConfigError(f"upstream.attenuate: apps needs a Fly macaroon (fm2_...) as the upstream credential; "
                          f"this one is not ({exc}); set upstream.attenuate: none to forward it as it is") from None
    if root.has(macaroon.THIRD_PARTY):
        raise ConfigError("upstream.attenuate: apps: the upstream macaroon has a third-party caveat, so every "
                          "narrowed copy would need its discharge; use a token without one, or "
                          "upstream.attenuate: none")
    if root.proof:
        raise ConfigError("upstream.attenuate: apps: the upstream credential is a discharge token, not a permission "
                          "token")
    return root


def required_actions(action: str) -> int:
    return macaroon.READ if action.endswith(_READ_SUFFIXES) else macaroon.ALL_ACTIONS


class Attenuator:
    def __init__(self, root: Macaroon, *, window_s: int, lookup: AppLookup,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.window_s = window_s
        self.lookup = lookup
        self.clock = clock
        self._ids: dict[str, tuple[int, float]] = {}  # app -> (numeric id, until)
        self._tokens: dict[tuple[int, int], tuple[str, float]] = {}  # (id, actions) -> (header, until)
        self._graphql: dict[tuple[str, ...], tuple[str, float]] = {}  # mutations -> (header, until)

    async def authorization(self, app: str | None, action: str, request_id: str) -> str:
        """The `Authorization` value for a request doing `action` on `app` (None: org-level)."""
        now = self.clock()
        if app is None or action == "apps:create":
            key = (0, 0)  # no Apps caveat: the zero id means "any app" to Fly, never sent
        else:
            key = (await self.app_id(app, request_id, now), required_actions(action))
        cached = self._tokens.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        start = int(now)
        added = [macaroon.validity_window(start - _SKEW_S, start + self.window_s)]
        if key != (0, 0):
            added.insert(0, macaroon.apps({key[0]: key[1]}))
        header = "FlyV1 " + macaroon.encode(macaroon.attenuate(self.root, *added))
        if len(self._tokens) >= _LIMIT:
            self._tokens = {}
        self._tokens[key] = (header, now + self.window_s / 5)
        return header

    async def app_id(self, app: str, request_id: str, now: float) -> int:
        known = self._ids.get(app)
        if known is not None and known[1] > now:
            return known[0]
        status, body = await self.lookup(app, request_id)
        if status == 404:
            raise NotFound(f"app {app} does not exist upstream")
        number = body.get("internal_numeric_id") if isinstance(body, dict) else None
        if status != 200 or not isinstance(number, int) or isinstance(number, bool) or number <= 0:
            raise UpstreamUnavailable(f"the upstream did not say app {app}'s numeric id (status {status}), which "
                                      "upstream.attenuate: apps needs; the request was not forwarded")
        if len(self._ids) >= _LIMIT:
            self._ids = {}
        self._ids[app] = (number, now + _ID_TTL_S)
        return number

    def graphql_authorization(self, mutations: tuple[str, ...]) -> str:
        """The `Authorization` value for a GraphQL body: a `Mutations` caveat naming exactly its
        mutations when it is only mutations (Fly refuses any query under one), and the window."""
        now = self.clock()
        key = mutations
        cached = self._graphql.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        start = int(now)
        added = [macaroon.validity_window(start - _SKEW_S, start + self.window_s)]
        if mutations:
            added.insert(0, macaroon.mutations(mutations))
        header = "FlyV1 " + macaroon.encode(macaroon.attenuate(self.root, *added))
        if len(self._graphql) >= _LIMIT:
            self._graphql = {}
        self._graphql[key] = (header, now + self.window_s / 5)
        return header

    def forget(self, app: str | None) -> None:
        """After a refused answer: the app's id may be stale (deleted and re-created)."""
        if app is not None and self._ids.pop(app, None) is not None:
            self._tokens = {}

