"""The sandbox's stand-in for Fly's REST API under `/api/v1/...`: uiex (orgs, builds, releases) and logs.

flyctl reaches these through `FLY_UIEX_BASE_URL` (internal/uiex/*.go: organizations, builds,
releases) and `FLY_API_BASE_URL` (fly-go resource_logs.go: `GET /api/v1/apps/{app}/logs`); both
live under the same prefix, so one route table serves both. The answers use the JSON field names
those Go structs decode, and they read and write the same `SandboxState` as the Machines API
emulation, so a release that `fly deploy` creates here shows up in GraphQL `releasesUnprocessed`
and a later `fly releases`. Errors are the sandbox's usual `{"error": message}`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.dev.sandbox_state import App, SandboxError, SandboxState, timestamp

__all__ = ["api_routes", "public_release"]

_RELEASE_FIELDS = ("id", "version", "stable", "in_progress", "status", "strategy", "user", "created_at", "image_ref")
_FINAL_STATUSES = frozenset({"complete", "failed", "interrupted"})
_LOG_PAGE = 100
_SANDBOX_USER = "sandbox@scopegate.dev"


def public_release(release: dict[str, Any]) -> dict[str, Any]:
    """uiex's `Release` (flyctl internal/uiex/releases.go); the stored record keeps more."""
    return {key: release[key] for key in _RELEASE_FIELDS}


def _state(request: Request) -> SandboxState:
    state = request.app.state.sandbox
    assert isinstance(state, SandboxState)
    return state


def _named_app(state: SandboxState, name: Any) -> App:
    if not isinstance(name, str) or not name:
        raise SandboxError(400, "app_name is required")
    if (app := state.apps.get(name)) is None:
        raise SandboxError(404, f"app {name} not found")
    return app


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(raw) if (raw := await request.body()).strip() else {}
    except ValueError:
        raise SandboxError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise SandboxError(400, "request body must be a JSON object")
    return body


async def organization(request: Request) -> Response:
    slug = str(request.path_params["slug"])
    if (org := _state(request).orgs.get(slug)) is None:
        raise SandboxError(404, f"organization {slug} not found")
    return JSONResponse({"organization": org.to_uiex()})


async def organizations(request: Request) -> Response:
    return JSONResponse({"organizations": [org.to_uiex() for org in _state(request).orgs.values()]})


async def create_build(request: Request) -> Response:
    state, body = _state(request), await _body(request)
    app = _named_app(state, body.get("app_name"))
    build_id = len(state.builds) + 1
    state.builds[build_id] = {"id": build_id, "app_name": app.name, "status": "in_progress",
                              "builder_type": body.get("builder_type"), "created_at": timestamp()}
    return JSONResponse({"id": build_id, "status": "in_progress", "wallclock_time_ms": 0})


async def finish_build(request: Request) -> Response:
    state, body = _state(request), await _body(request)
    build = state.builds.get(body["build_id"]) if isinstance(body.get("build_id"), int) else None
    if build is None:
        raise SandboxError(404, f"build {body.get('build_id')} not found")
    if body.get("app_name") != build["app_name"]:
        raise SandboxError(400, f"build {build['id']} belongs to app {build['app_name']}")
    build.update(status=str(body.get("status") or "completed"), final_image=body.get("final_image"))
    return JSONResponse({"id": build["id"], "status": build["status"], "wallclock_time_ms": 0})


async def create_release(request: Request) -> Response:
    state, body = _state(request), await _body(request)
    app = _named_app(state, body.get("app_name"))
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise SandboxError(400, "image is required")
    release = state.new_release(app, image, str(body.get("strategy") or ""), body.get("definition"), _SANDBOX_USER)
    return JSONResponse({"release": public_release(release)}, status_code=201)


async def update_release(request: Request) -> Response:
    app, release = _state(request).release(str(request.path_params["release_id"]))
    body = await _body(request)
    status = body.get("status")
    if not isinstance(status, str) or not status:
        raise SandboxError(400, "status is required")
    release.update(status=status, in_progress=status not in _FINAL_STATUSES, metadata=body.get("metadata"))
    if status == "complete":
        for other in app.releases:
            other["stable"] = other is release
    app.log(f"Release v{release['version']} is {status}")
    return JSONResponse(public_release(release))


def _app(request: Request) -> App:
    return _named_app(_state(request), str(request.path_params["app_name"]))


async def list_releases(request: Request) -> Response:
    newest_first = [public_release(r) for r in reversed(_app(request).releases)]
    limit = request.query_params.get("limit", "")
    return JSONResponse({"releases": newest_first[: int(limit)] if limit.isdigit() else newest_first})


async def current_release(request: Request) -> Response:
    done = [r for r in _app(request).releases if r["status"] == "complete"]
    if not done:
        raise SandboxError(404, "no current release")
    return JSONResponse(public_release(done[-1]))


async def app_logs(request: Request) -> Response:
    """fly-go `GetAppLogs`: a page after `next_token` (here: an index), newest token in `meta`."""
    app, query = _app(request), request.query_params
    token = query.get("next_token", "")
    start = int(token) if token.isdigit() else max(len(app.logs) - _LOG_PAGE, 0)
    page = [e for e in app.logs[start:start + _LOG_PAGE]
            if query.get("instance", e["instance"]) in (e["instance"], "")
            and query.get("region", e["region"]) in (e["region"], "")]
    data = [{"id": entry["id"], "type": "logs", "attributes": {k: v for k, v in entry.items() if k != "id"}}
            for entry in page]
    return JSONResponse({"data": data, "meta": {"next_token": str(min(start + _LOG_PAGE, len(app.logs)))}})


async def no_volumes(request: Request) -> Response:
    """Machines API `GET /v1/apps/{app}/volumes`: the sandbox has no volumes (`fly scale count` asks)."""
    _app(request)
    return JSONResponse([])


async def no_ip_assignments(request: Request) -> Response:
    """Machines API `GET /v1/apps/{app}/ip_assignments`: no public IPs, so flyctl's DNS check has
    nothing to resolve (it asks after `fly secrets set` and a deploy without --dns-checks=false)."""
    _app(request)
    return JSONResponse({"ips": []})


def api_routes() -> list[Route]:
    """uiex and logs, plus two read-only Machines API listings flyctl needs that sandbox.py lacks."""
    return [
        Route("/v1/apps/{app_name}/volumes", no_volumes, methods=["GET"]),
        Route("/v1/apps/{app_name}/ip_assignments", no_ip_assignments, methods=["GET"]),
        Route("/api/v1/organizations", organizations, methods=["GET"]),
        Route("/api/v1/organizations/{slug}", organization, methods=["GET"]),
        Route("/api/v1/builds", create_build, methods=["POST"]),
        Route("/api/v1/builds/finish", finish_build, methods=["POST"]),
        Route("/api/v1/releases", create_release, methods=["POST"]),
        Route("/api/v1/releases/{release_id}", update_release, methods=["PATCH"]),
        Route("/api/v1/apps/{app_name}/releases", list_releases, methods=["GET"]),
        Route("/api/v1/apps/{app_name}/releases/current", current_release, methods=["GET"]),
        Route("/api/v1/apps/{app_name}/logs", app_logs, methods=["GET"]),
    ]
