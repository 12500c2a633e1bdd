"""The console on the Redis store: a session started at one instance works at another (sessions
are store facts), a sign-out at one ends it at both, and the live audit view follows the Redis
audit stream that every instance writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway
from tests.servers import RecordingUpstream, ServerThread
from tests.test_console import UI, csrf_of
from tests.test_redis_store import RedisServer
from tests.test_scale_out import start_instances


@pytest.fixture
def pair(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread],
         monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    redis = RedisServer(tmp_path / "redis").start()
    a, b = start_instances(tmp_path, redis.url, upstream, audit={"sinks": ["redis"]})
    try:
        yield a, b
    finally:
        a.server.stop()
        b.server.stop()
        redis.kill()


def test_a_session_and_its_end_are_shared_by_every_instance(pair: tuple[RunningGateway, RunningGateway]) -> None:
    a, b = pair
    admin = a.mint("token-admin@gateway", name="admin")
    with httpx.Client(base_url=a.url, timeout=10) as at_a, httpx.Client(base_url=b.url, timeout=10) as at_b:
        form = at_a.get(f"{UI}/signin")
        assert at_a.post(f"{UI}/signin", data={"csrf": csrf_of(form.text), "token": admin}).status_code == 303
        at_b.cookies.set("sg_console", at_a.cookies["sg_console"], path="/_gateway/ui/")
        page = at_b.get(f"{UI}/tokens")
        assert page.status_code == 200 and "admin" in page.text
        assert at_b.post(f"{UI}/signout", data={"csrf": csrf_of(page.text)}).status_code == 303
        assert at_a.get(f"{UI}/tokens").status_code == 303  # back to sign-in: ended everywhere


def test_the_audit_view_follows_the_redis_stream(pair: tuple[RunningGateway, RunningGateway]) -> None:
    a, b = pair
    admin = a.mint("token-admin@gateway", name="admin")
    viewer = a.mint("viewer@app:web-staging", name="viewer")
    with httpx.Client(base_url=a.url, timeout=10) as client:
        form = client.get(f"{UI}/signin")
        client.post(f"{UI}/signin", data={"csrf": csrf_of(form.text), "token": admin})
        with client.stream("GET", f"{UI}/audit/events", params={"decision": "deny", "token": "viewer"}) as events:
            lines = events.iter_lines()
            # The request is refused at the *other* instance, after the stream opened.
            refused = httpx.get(f"{b.url}/v1/apps/web-prod/machines", headers={"authorization": f"Bearer {viewer}"})
            assert refused.status_code == 403
            for line in lines:
                if line.startswith("data: "):
                    records = json.loads(line[6:])
                    assert [r["path"] for r in records] == ["/v1/apps/web-prod/machines"]
                    assert records[0]["decision"] == "deny" and records[0]["token_name"] == "viewer"
                    break
