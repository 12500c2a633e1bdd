"""Request-shape constraints: parsed strictly, enforced on bodies before anything is forwarded."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from gateway.core.constraints import Constraint, ConstraintSet, VolumeOwnership, enforce, image_repository
from gateway.errors import ConfigError, Forbidden
from tests.conftest import RunningGateway
from tests.servers import Reply

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("image", "repository"), [
    ("registry.fly.io/web:deployment-1", "registry.fly.io/web"),
    ("registry.fly.io/web@sha256:abc", "registry.fly.io/web"),
    ("registry.fly.io/web:1@sha256:abc", "registry.fly.io/web"),
    ("localhost:5000/web", "localhost:5000/web"),
    ("localhost:5000/web:2", "localhost:5000/web"),
    ("nginx", "nginx"),
])
def test_image_repository(image: str, repository: str) -> None:
    assert image_repository(image) == repository


@pytest.mark.parametrize(("document", "message"), [
    ({"constraints": [{"actions": ["machines:deploy"], "images": ["x"]}]}, "`name` is required"),
    ({"constraints": [{"name": "n", "actions": ["machines:deploy"]}]}, "says nothing to check"),
    ({"constraints": [{"name": "n", "actions": ["machines:deploy"], "imagez": ["x"]}]}, "unknown keys"),
    ({"constraints": [{"name": "n", "actions": ["machines:deploy"], "max_guest": {"cpu": 1}}]}, "max_guest"),
    ({"constraints": [{"name": "n", "actions": ["machines:exec"], "commands": ["ls"]}]}, "argument lists"),
    ({"constraints": [{"name": "n", "images": ["x"]}]}, "`actions`"),
])
def test_bad_constraint_files_name_the_problem(tmp_path: Path, document: object, message: str) -> None:
    path = tmp_path / "constraints.yaml"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=message):
        ConstraintSet.load(path)


def test_shipped_constraints_load_and_apply_by_role_env_and_action() -> None:
    shipped = ConstraintSet.load(REPO / "policies/constraints.yaml")
    names = {c.name for c in shipped.applicable("deployer", "production", "machines:deploy")}
    assert "deployers ship images from the app's own Fly registry" in names
    assert "production machines stay within size and regions" in names
    assert {c.name for c in shipped.applicable("admin", "staging", "machines:deploy")} == {
        "volumes, forks and restores stay within the app"}
    assert shipped.applicable("viewer", "staging", "machines:read") == ()
    assert Constraint("n", ("machines:*",), images=("x",)).applies("admin", "dev", "machines:deploy")


def _post(gateway: RunningGateway, token: str, path: str, body: object) -> tuple[int, dict[str, object]]:
    with gateway.client() as client:
        response = client.post(path, content=json.dumps(body), headers={"Authorization": f"Bearer {token}"})
    return response.status_code, response.json()


CASES = [
    ("own registry image", "deployer@app:web-staging", "/v1/apps/web-staging/machines",
     {"config": {"image": "registry.fly.io/web-staging:deployment-7"}}, 200, None),
    ("another app's image", "deployer@app:web-staging", "/v1/apps/web-staging/machines",
     {"config": {"image": "registry.fly.io/web-prod:deployment-7"}}, 403, "config.image"),
    ("public image", "deployer@app:web-staging", "/v1/apps/web-staging/machines",
     {"config": {"image": "docker.io/library/nginx:latest"}}, 403, "config.image"),
    ("container image", "deployer@app:web-staging", "/v1/apps/web-staging/machines/m1",
     {"config": {"image": "registry.fly.io/web-staging:1", "containers": [{"image": "evil.io/x"}]}}, 403,
     "config.containers[0].image"),
    ("admin is not bound by the deployer image rule", "admin@app:web-staging", "/v1/apps/web-staging/machines",
     {"config": {"image": "docker.io/library/nginx:latest"}}, 200, None),
    ("production size cap", "deployer@app:web-prod", "/v1/apps/web-prod/machines",
     {"config": {"image": "registry.fly.io/web-prod:1", "guest": {"cpus": 16}}}, 403, "config.guest.cpus"),
    ("production size within cap", "deployer@app:web-prod", "/v1/apps/web-prod/machines",
     {"config": {"image": "registry.fly.io/web-prod:1", "guest": {"cpus": 2, "memory_mb": 4096}}}, 200, None),
    ("staging has no size cap", "deployer@app:web-staging", "/v1/apps/web-staging/machines",
     {"config": {"image": "registry.fly.io/web-staging:1", "guest": {"cpus": 16}}}, 200, None),
    ("own volume mount", "admin@app:web-staging", "/v1/apps/web-staging/machines",
     {"config": {"mounts": [{"volume": "vol_own", "path": "/data"}]}}, 200, None),
    ("another app's volume mount", "admin@app:web-staging", "/v1/apps/web-staging/machines",
     {"config": {"mounts": [{"volume": "vol_other", "path": "/data"}]}}, 403, "config.mounts[0].volume"),
    ("volume id with path characters", "admin@app:web-staging", "/v1/apps/web-staging/machines",
     {"config": {"mounts": [{"volume": "../web-prod/volumes/vol_x", "path": "/d"}]}}, 403, "config.mounts[0]"),
    ("fork another app's volume", "deployer@app:web-staging", "/v1/apps/web-staging/volumes",
     {"name": "data", "source_volume_id": "vol_other"}, 403, "source_volume_id"),
    ("fork own volume", "deployer@app:web-staging", "/v1/apps/web-staging/volumes",
     {"name": "data", "source_volume_id": "vol_own"}, 200, None),
    ("restore own snapshot", "deployer@app:web-staging", "/v1/apps/web-staging/volumes",
     {"name": "data", "snapshot_id": "vs_own"}, 200, None),
    ("restore another app's snapshot", "deployer@app:web-staging", "/v1/apps/web-staging/volumes",
     {"name": "data", "snapshot_id": "vs_other"}, 403, "snapshot_id"),
    ("allowed exec", "admin@app:web-staging", "/v1/apps/web-staging/machines/m1/exec",
     {"command": ["df", "-h"]}, 200, None),
    ("allowed legacy exec", "admin@app:web-staging", "/v1/apps/web-staging/machines/m1/exec",
     {"cmd": "ps aux"}, 200, None),
    ("exec outside the allow-list", "admin@app:web-staging", "/v1/apps/web-staging/machines/m1/exec",
     {"command": ["sh", "-c", "cat /proc/self/environ"]}, 403, "command"),
    ("exec with extra arguments", "admin@app:web-staging", "/v1/apps/web-staging/machines/m1/exec",
     {"command": ["df", "-h", "/"]}, 403, "command"),
    ("exec without a command", "admin@app:web-staging", "/v1/apps/web-staging/machines/m1/exec", {}, 403, "command"),
]


@pytest.mark.parametrize(("grant", "path", "body", "status", "field"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_constraints_through_the_gateway(gateway: RunningGateway, grant: str, path: str, body: object, status: int,
                                         field: str | None) -> None:
    replies = gateway.upstream.replies
    replies[b"/v1/apps/web-staging/volumes/vol_own"] = Reply(body=b'{"id": "vol_own"}')
    replies[b"/v1/apps/web-staging/volumes/vol_other"] = Reply(status=404, body=b'{"error": "not found"}')
    replies[b"/v1/apps/web-staging/volumes"] = Reply(body=b'[{"id": "vol_own"}]')
    replies[b"/v1/apps/web-staging/volumes/vol_own/snapshots"] = Reply(body=b'[{"id": "vs_own"}]')
    token = gateway.mint(grant)
    got_status, answer = _post(gateway, token, path, body)
    assert got_status == status, answer
    forwarded = [r for r in gateway.upstream.received if r.method == "POST"]
    if status == 200:
        assert len(forwarded) == 1 and forwarded[0].raw_path == path.encode()
        assert json.loads(forwarded[0].body) == body
    else:
        assert forwarded == []
        assert answer["error"] == "forbidden" and field is not None and field in str(answer["message"])


def test_unreadable_body_is_refused_when_a_constraint_applies(gateway: RunningGateway) -> None:
    token = gateway.mint("deployer@app:web-staging")
    with gateway.client() as client:
        response = client.post("/v1/apps/web-staging/machines", content=b"not json",
                               headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400
    assert gateway.upstream.received == []


# --- fields the constraint could not see before (issue 15, class 3) ------------------------------

async def _never_owned(app: str, ident: str) -> bool:
    return False


OWNERSHIP = VolumeOwnership(volume=_never_owned, snapshot=_never_owned)
VOLUMES = Constraint(name="volumes", actions=("volumes:create",), images=("registry.fly.io/{app}",),
                     max_guest=(("cpus", 2), ("memory_mb", 2048)))
EXEC_ONLY = Constraint(name="exec", actions=("machines:exec",), commands=(("uptime",),))


@pytest.mark.parametrize(("constraint", "document", "field"), [
    (VOLUMES, {"name": "data", "compute_image": "docker.io/evil/miner"}, "compute_image"),
    (VOLUMES, {"name": "data", "compute": {"cpus": 16}}, "compute.cpus"),
    (VOLUMES, {"name": "data", "compute": {"memory_mb": 1024, "max_memory_mb": 65536}}, "compute.max_memory_mb"),
    (VOLUMES, {"config": {"size": "performance-16x"}}, "config.size"),
    (EXEC_ONLY, {"command": ["uptime"], "stdin": "rm -rf /data\n"}, "stdin"),
])
def test_fields_beside_the_judged_ones_are_judged_too(constraint: Constraint, document: dict[str, object],
                                                      field: str) -> None:
    with pytest.raises(Forbidden, match=re.escape(f"'{field}'")):
        asyncio.run(enforce((constraint,), app="web", document=document, ownership=OWNERSHIP))


@pytest.mark.parametrize(("constraint", "document"), [
    (VOLUMES, {"name": "data", "compute_image": "registry.fly.io/web:1", "compute": {"cpus": 2, "memory_mb": 2048}}),
    (EXEC_ONLY, {"command": ["uptime"], "stdin": ""}),
])
def test_judged_fields_within_bounds_pass(constraint: Constraint, document: dict[str, object]) -> None:
    asyncio.run(enforce((constraint,), app="web", document=document, ownership=OWNERSHIP))
