"""An in-memory stand-in for a small part of the Fly Machines API, used by `scopegate serve --dev`.

It lets someone try Scopegate end to end without a Fly account: apps, machines (with leases and
metadata), app secrets and the region list live in a `SandboxState` held on `app.state`, and the
answers use the field names of the upstream OpenAPI spec (`ListAppsResponse`, `App`, `Machine`,
`Lease`, `AppSecrets`, `AppSecret`, `ErrorResponse`, ...). It is never meant for production: nothing
is persisted or run, and any route not listed in `_routes` gets a 404 naming the call, so a gap in
the emulation is never mistaken for a real answer.

Every request must carry `Authorization: Bearer <expected_token>`. The gateway is supposed to drop
the caller's token and inject the upstream credential; by refusing anything else the sandbox proves,
in dev mode and in tests, that the injection really happened.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.dev.sandbox_api import api_routes
from gateway.dev.sandbox_graphql import graphql_routes
from gateway.dev.sandbox_macaroon import RequireMacaroon, numeric_ids, release_apps
from gateway.dev.sandbox_state import (
    SANDBOX_ORG_SLUG,
    App,
    SandboxError,
    SandboxState,
    grant_lease,
    image_ref,
    lease_json,
    public_secret,
    timestamp,
)

__all__ = ["SANDBOX_ORG_SLUG", "SandboxError", "SandboxState", "create_sandbox_app"]

_REGIONS = {"iad": "Ashburn, Virginia (US)", "ord": "Chicago, Illinois (US)", "lhr": "London, United Kingdom",
            "ams": "Amsterdam, Netherlands", "nrt": "Tokyo, Japan", "syd": "Sydney, Australia"}
_SIGNALS = frozenset({"SIGABRT", "SIGALRM", "SIGFPE", "SIGHUP", "SIGILL", "SIGINT", "SIGKILL", "SIGPIPE",
                      "SIGQUIT", "SIGSEGV", "SIGTERM", "SIGTRAP", "SIGUSR1", "SIGUSR2"})
_WAITABLE_STATES = frozenset({"started", "stopped", "suspended"})
_TRUE_WORDS = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool, as Fly reads it
_APP_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,62}")
_LEASE_NONCE_HEADER = "fly-machine-lease-nonce"


def _state(request: Request) -> SandboxState:
    state = request.app.state.sandbox
    assert isinstance(state, SandboxState)
    return state


def _app(request: Request) -> App:
    name = str(request.path_params["app_name"])
    if (app := _state(request).apps.get(name)) is None:
        raise SandboxError(404, f"app {name} not found")
    return app


def _machine(request: Request) -> tuple[App, dict[str, Any]]:
    app, machine_id = _app(request), str(request.path_params["machine_id"])
    if (machine := app.machines.get(machine_id)) is None:
        raise SandboxError(404, f"machine {machine_id} not found")
    return app, machine


def _check_lease(request: Request, app: App, machine_id: str) -> None:
    """Fly refuses changes to a leased machine unless the caller presents the lease's nonce."""
    lease, nonce = app.live_lease(machine_id), request.headers.get(_LEASE_NONCE_HEADER, "")
    if lease is not None and not hmac.compare_digest(nonce, lease["nonce"]):
        raise SandboxError(409, f"machine {machine_id} is leased by {lease['owner']}; "
                                f"send its nonce in {_LEASE_NONCE_HEADER}")


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise SandboxError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise SandboxError(400, "request body must be a JSON object")
    return body


async def _string_field(request: Request, key: str) -> str:
    if not isinstance(value := (await _body(request)).get(key), str):
        raise SandboxError(400, f"{key} must be a string")
    return value


def _flag(request: Request, key: str) -> bool:
    # True if *any* repetition says true: erring towards revealing makes a gateway test fail when
    # query smuggling such as `?show_secrets=false&show_secrets=true` slips through.
    return any(v in _TRUE_WORDS for v in request.query_params.getlist(key))


async def apps_collection(request: Request) -> Response:
    state = _state(request)
    if request.method == "GET":
        if not (org := request.query_params.get("org_slug")):
            raise SandboxError(400, "org_slug is required")
        # Sandbox apps have no role, so a role filter (flyctl's remote-builder lookup) matches nothing.
        role = request.query_params.get("app_role")
        apps = [a.to_json() for a in state.apps.values() if a.org_slug == org and not role]
        return JSONResponse({"total_apps": len(apps), "apps": apps})
    body = await _body(request)
    name, org = body.get("name"), body.get("org_slug")
    if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
        raise SandboxError(400, "name must be 2-63 lowercase letters, digits or dashes")
    if not isinstance(org, str) or not org:
        raise SandboxError(400, "org_slug is required")
    if name in state.apps:
        raise SandboxError(409, f"app {name} already exists")
    state.apps[name] = App(name=name, org_slug=org, network=str(body.get("network") or "default"))
    return JSONResponse(state.apps[name].to_json(), status_code=201)


async def app_detail(request: Request) -> Response:
    app = _app(request)
    if request.method == "DELETE":
        del _state(request).apps[app.name]
        return Response(status_code=202)
    return JSONResponse(app.to_json())


def _config_and_region(body: dict[str, Any], default_region: str) -> tuple[dict[str, Any], str]:
    config, region = body.get("config"), body.get("region") or default_region
    if not isinstance(config, dict) or not isinstance(config.get("image"), str) or not config["image"]:
        raise SandboxError(400, "config.image is required")
    if not isinstance(region, str) or region not in _REGIONS:
        raise SandboxError(400, f"region {region} is not one of {', '.join(sorted(_REGIONS))}")
    return config, region


async def machines_collection(request: Request) -> Response:
    app, query = _app(request), request.query_params
    if request.method == "GET":
        machines = [m for m in app.machines.values() if m["region"] == query.get("region", m["region"])]
        if states := query.get("state"):
            machines = [m for m in machines if m["state"] in states.split(",")]
        return JSONResponse(machines)
    body = await _body(request)
    config, region = _config_and_region(body, "iad")
    name = body.get("name") if isinstance(body.get("name"), str) else None
    machine = _state(request).new_machine(app, config, region, name)
    if body.get("skip_launch") is True:
        machine.update(state="created", updated_at=timestamp())
    if "lease_ttl" in body:  # Fly returns the nonce only here, when creation also took a lease
        return JSONResponse({**machine, "nonce": grant_lease(app, machine, body["lease_ttl"])["nonce"]})
    return JSONResponse(machine)


async def machine_detail(request: Request) -> Response:
    app, machine = _machine(request)
    if request.method == "GET":
        return JSONResponse(machine)
    _check_lease(request, app, machine["id"])
    if request.method == "DELETE":
        if machine["state"] == "started" and not (_flag(request, "force") or _flag(request, "kill")):
            raise SandboxError(412, "unable to destroy machine, not currently stopped or suspended")
        del app.machines[machine["id"]]
        app.leases.pop(machine["id"], None)
        return JSONResponse({"ok": True})
    body = await _body(request)
    machine["config"], machine["region"] = _config_and_region(body, machine["region"])
    machine["image_ref"] = image_ref(machine["config"]["image"])
    machine["name"] = body["name"] if isinstance(body.get("name"), str) and body["name"] else machine["name"]
    machine["instance_id"] = secrets.token_hex(13).upper()
    machine.update(state="stopped" if body.get("skip_launch") is True else "started", updated_at=timestamp())
    return JSONResponse(machine)


def _lifecycle(target: str | None, action: str) -> Callable[[Request], Awaitable[Response]]:
    """One handler per lifecycle call; `target=None` means the call leaves `state` alone."""

    async def handler(request: Request) -> Response:
        app, machine = _machine(request)
        if action == "signal" and str((await _body(request)).get("signal")) not in _SIGNALS:
            raise SandboxError(400, f"signal must be one of {', '.join(sorted(_SIGNALS))}")
        if target is not None:
            _check_lease(request, app, machine["id"])
            machine.update(state=target, updated_at=timestamp())
        return JSONResponse({"ok": True})

    return handler


async def wait_machine(request: Request) -> Response:
    _, machine = _machine(request)
    want = request.query_params.get("state", "started")
    if want not in _WAITABLE_STATES:
        raise SandboxError(400, f"state must be one of {', '.join(sorted(_WAITABLE_STATES))}")
    try:
        timeout = float(request.query_params.get("timeout", "1"))
    except ValueError:
        raise SandboxError(400, "timeout must be a number of seconds") from None
    # Only another request can change a state here, so waiting past a second would just stall callers.
    deadline = time.monotonic() + min(max(timeout, 0.0), 1.0)
    while machine["state"] != want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if machine["state"] != want:
        raise SandboxError(408, f"timed out waiting for machine {machine['id']} to be {want}")
    return JSONResponse({"ok": True, "state": want, "version": machine["instance_id"]})


async def lease(request: Request) -> Response:
    app, machine = _machine(request)
    held = app.live_lease(machine["id"])
    if request.method == "POST":
        _check_lease(request, app, machine["id"])
        body = await _body(request)
        new = grant_lease(app, machine, body.get("ttl"), str(body.get("description") or ""))
        return JSONResponse(lease_json(new), status_code=201)
    if held is None:
        raise SandboxError(404, f"machine {machine['id']} has no lease")
    if request.method == "DELETE":
        _check_lease(request, app, machine["id"])
        del app.leases[machine["id"]]
        return JSONResponse({"ok": True})
    return JSONResponse(lease_json(held))


def _metadata(machine: dict[str, Any]) -> dict[str, str]:
    # Fly keeps metadata inside the machine config, so a config update replaces it as well.
    meta = machine["config"].setdefault("metadata", {})
    assert isinstance(meta, dict)
    return meta


async def metadata(request: Request) -> Response:
    _, machine = _machine(request)
    if request.method == "GET":
        return JSONResponse(_metadata(machine))
    new = (await _body(request)).get("metadata")
    if not isinstance(new, dict) or not all(isinstance(v, str) for v in new.values()):
        raise SandboxError(400, "metadata must be an object of string values")
    if request.method == "PUT":
        _metadata(machine).clear()
    _metadata(machine).update(new)
    return Response(status_code=204)


async def metadata_key(request: Request) -> Response:
    _, machine = _machine(request)
    meta, key = _metadata(machine), str(request.path_params["key"])
    if request.method == "POST":
        meta[key] = await _string_field(request, "value")
        return Response(status_code=204)
    if key not in meta:
        raise SandboxError(404, f"metadata key {key} not found")
    if request.method == "DELETE":
        del meta[key]
        return Response(status_code=204)
    return JSONResponse({"value": meta[key]})


async def secrets_collection(request: Request) -> Response:
    app = _app(request)
    if request.method == "GET":
        show = _flag(request, "show_secrets")
        return JSONResponse({"secrets": [public_secret(s, show) for s in app.secrets.values()]})
    values = (await _body(request)).get("values")
    if not isinstance(values, dict) or not all(v is None or isinstance(v, str) for v in values.values()):
        raise SandboxError(400, "values must be an object of strings (null unsets a secret)")
    for name, value in values.items():
        if value is None:
            app.secrets.pop(name, None)
        else:
            app.put_secret(name, value)
    version = app.bump_secrets_version()
    return JSONResponse({"secrets": [public_secret(s, False) for s in app.secrets.values()], **version})


async def secret(request: Request) -> Response:
    app, name = _app(request), str(request.path_params["secret_name"])
    if request.method == "POST":
        created = public_secret(app.put_secret(name, await _string_field(request, "value")), False)
        return JSONResponse({**created, **app.bump_secrets_version()}, status_code=201)
    if name not in app.secrets:
        raise SandboxError(404, f"secret {name} not found")
    if request.method == "DELETE":
        del app.secrets[name]
        return JSONResponse(app.bump_secrets_version())
    return JSONResponse(public_secret(app.secrets[name], _flag(request, "show_secrets")))


async def regions(request: Request) -> Response:
    rows = [{"code": code, "name": name, "gateway_available": True, "requires_paid_plan": False,
             "deprecated": False} for code, name in _REGIONS.items()]
    return JSONResponse({"nearest": "iad", "regions": rows})


async def not_emulated(request: Request) -> Response:
    raise SandboxError(404, f"the sandbox does not emulate {request.method} {request.url.path}")


async def _render_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SandboxError)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


class _RequireUpstreamToken:
    """Refuses every HTTP request whose Authorization is not exactly `Bearer <expected_token>`.

    GraphQL and the REST API under /api/v1 also take `FlyV1 <expected_token>`: fly-go sends that
    scheme there whenever the token is a macaroon, while the Machines API keeps insisting on Bearer."""

    def __init__(self, app: ASGIApp, expected_token: str) -> None:
        self.app, self.expected = app, expected_token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            supplied = Headers(scope=scope).getlist("authorization")
            scheme, _, credential = (supplied[0] if len(supplied) == 1 else "").partition(" ")
            matches = hmac.compare_digest(credential.encode("latin-1"), self.expected)
            path = scope["path"]
            flyv1_ok = path == "/graphql" or path.startswith("/api/v1/")
            if scheme.lower() not in (("bearer", "flyv1") if flyv1_ok else ("bearer",)) or not matches:
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _routes() -> list[Route]:
    app, m = "/v1/apps/{app_name}", "/v1/apps/{app_name}/machines/{machine_id}"
    lifecycle = [("start", "started"), ("stop", "stopped"), ("restart", "started"), ("suspend", "suspended"),
                 ("cordon", None), ("uncordon", None), ("signal", None)]
    return [
        Route("/v1/apps", apps_collection, methods=["GET", "POST"]),
        Route(app, app_detail, methods=["GET", "DELETE"]),
        Route(f"{app}/machines", machines_collection, methods=["GET", "POST"]),
        Route(m, machine_detail, methods=["GET", "POST", "DELETE"]),
        *(Route(f"{m}/{verb}", _lifecycle(target, verb), methods=["POST"]) for verb, target in lifecycle),
        Route(f"{m}/wait", wait_machine, methods=["GET"]),
        Route(f"{m}/lease", lease, methods=["GET", "POST", "DELETE"]),
        Route(f"{m}/metadata", metadata, methods=["GET", "PUT", "PATCH"]),
        Route(f"{m}/metadata/{{key}}", metadata_key, methods=["GET", "POST", "DELETE"]),
        Route(f"{app}/secrets", secrets_collection, methods=["GET", "POST"]),
        Route(f"{app}/secrets/{{secret_name}}", secret, methods=["GET", "POST", "DELETE"]),
        Route("/v1/platform/regions", regions, methods=["GET"]),
        *graphql_routes(),
        *api_routes(),
        # Last and for every method, so a known path with an unemulated method also says so plainly.
        Route("/{path:path}", not_emulated, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    ]


def create_sandbox_app(*, expected_token: str = "", macaroon_key: bytes | None = None,
                       seed: bool = True) -> Starlette:
    """A fresh sandbox; with `seed`, apps web-staging, web-prod and api-staging in org
    `SANDBOX_ORG_SLUG` each get one started machine, one release and a `DATABASE_URL` secret.
    Requests must carry `expected_token`, or, with `macaroon_key`, a Fly macaroon minted from that
    key whose caveats permit them (sandbox_macaroon.py)."""
    if not expected_token and macaroon_key is None:
        raise ValueError("give the sandbox an expected_token or a macaroon_key")
    state = SandboxState()
    if seed:
        state.seed()
    guard = (Middleware(RequireMacaroon, key=macaroon_key, numeric_id=numeric_ids(state),
                        release_app=release_apps(state)) if macaroon_key
             else Middleware(_RequireUpstreamToken, expected_token=expected_token))
    sandbox = Starlette(
        routes=_routes(),
        middleware=[guard],
        exception_handlers={SandboxError: _render_error},
    )
    sandbox.state.sandbox = state
    return sandbox
