"""The image registry surface (/v2/...) with real clients and a real upstream registry.

skopeo (Debian) and crane (built from its Go module by scripts/install-test-tools) push and pull
through a real gateway (uvicorn on loopback) in front of a real registry (Debian's
docker-registry, CNCF distribution 2.8) that checks the credential the gateway injects with
htpasswd basic auth. Every refusal is checked against the registry's access log: nothing of a
refused request reaches it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.dev.local_registry import LocalRegistry
from tests.conftest import CREDENTIAL_ENV, UPSTREAM_SECRET, RunningGateway, start_gateway
from tests.registry_servers import Clients, OciImage, UpstreamLog, make_image
from tests.servers import RecordingUpstream, ServerThread, raw_request

WRITES = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    running = LocalRegistry(tmp_path_factory.mktemp("registry"), user="x", password=UPSTREAM_SECRET).start()
    yield running
    running.stop()


@dataclass
class Setup:
    gateway: RunningGateway
    registry: LocalRegistry
    log: UpstreamLog
    clients: Clients
    folder: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def ref(self, name: str) -> str:
        return f"docker://{self.host}/{name}"

    def http(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.gateway.url, headers=headers, timeout=20)

    def push(self, image: OciImage, name: str, token: str) -> None:
        done = self.clients.skopeo_copy(image.reference, self.ref(name), token)
        assert done.returncode == 0, done.stderr

    def refused_quietly(self, mark: int) -> None:
        """Nothing reached the upstream registry since `mark`."""
        assert self.log.since(mark) == []


def open_setup(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], registry: LocalRegistry,
               limits: dict[str, Any] | None = None) -> Setup:
    recorder, server = upstream
    gateway = start_gateway(tmp_path, recorder, server, upstream={"registry_url": registry.url}, limits=limits or {})
    return Setup(gateway, registry, UpstreamLog(registry), Clients(tmp_path / "home", f"127.0.0.1:{gateway.port}"),
                 tmp_path)


@pytest.fixture
def setup(tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], registry: LocalRegistry,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    running = open_setup(tmp_path, upstream, registry)
    yield running
    running.gateway.server.stop()


def errors_of(response: httpx.Response) -> str:
    body = response.json()
    assert body["request_id"] and body["error"] and body["message"]
    assert body["errors"][0]["detail"] == {"request_id": body["request_id"]}
    return str(body["errors"][0]["code"])


def test_login_challenge_and_credentials(setup: Setup) -> None:
    token = setup.gateway.mint("deployer@app:web-staging")
    mark = setup.log.mark()
    with setup.http(None) as client:
        challenge = client.get("/v2/")
        assert challenge.status_code == 401
        assert challenge.headers["www-authenticate"] == 'Basic realm="scopegate"'
        assert challenge.headers["docker-distribution-api-version"] == "registry/2.0"
        assert errors_of(challenge) == "UNAUTHORIZED"
        assert client.get("/v2/", auth=("x", token)).status_code == 200
        assert client.get("/v2/", auth=("anyone", token)).status_code == 200  # any user name
        assert client.get("/v2/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client.get("/v2/", auth=("x", UPSTREAM_SECRET)).status_code == 401  # not a gateway token
        assert client.get("/v2/", auth=("x", token[:-2] + "xx")).status_code == 401
    # docker login is a GET /v2/ answered by the gateway: nothing is forwarded for it.
    setup.refused_quietly(mark)
    done = setup.clients.crane_login(token)
    assert done.returncode == 0, done.stderr


def test_push_and_pull_with_skopeo_and_crane(setup: Setup) -> None:
    token = setup.gateway.mint("deployer@app:web-staging")
    image = make_image(setup.folder, "v1", {"hello.txt": b"hello through the gateway\n"})
    mark = setup.log.mark()
    setup.push(image, "web-staging:v1", token)
    forwarded = setup.log.since(mark)
    methods = {(method, target.split("?")[0].rsplit("/", 1)[0]) for method, target, _ in forwarded}
    assert ("POST", "/v2/web-staging/blobs/uploads") in methods  # uploads went through the gateway
    assert ("PUT", "/v2/web-staging/manifests") in methods
    assert all(status < 400 or method == "HEAD" for method, _, status in forwarded), forwarded
    # skopeo reads it back, byte for byte.
    raw = setup.clients.skopeo("inspect", setup.ref("web-staging:v1"), token, "--raw")
    assert raw.returncode == 0, raw.stderr
    assert "sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest() == image.manifest_digest
    back = setup.clients.skopeo_copy(setup.ref("web-staging:v1"), f"oci:{setup.folder / 'back'}:v1", token)
    assert back.returncode == 0, back.stderr
    assert (setup.folder / "back/blobs/sha256" / image.layer_digest.split(":")[1]).read_bytes() == image.layer
    # crane: log in like docker, read the digest, the tags and a blob, then push an image of its own.
    assert setup.clients.crane_login(token).returncode == 0
    digest = setup.clients.crane("digest", f"{setup.host}/web-staging:v1")
    assert digest.stdout.strip() == image.manifest_digest, digest.stderr
    assert setup.clients.crane_bytes("blob", f"{setup.host}/web-staging@{image.layer_digest}") == image.layer
    tar = setup.folder / "layer.tar"
    tar.write_bytes(b"crane-layer " * 4096)  # not a tarball: crane gzips it as one layer anyway
    appended = setup.clients.crane("append", "-f", str(tar), "-t", f"{setup.host}/web-staging:crane")
    assert appended.returncode == 0, appended.stderr
    tags = setup.clients.crane("ls", f"{setup.host}/web-staging")
    assert set(tags.stdout.split()) >= {"v1", "crane"}, tags.stderr
    # The audit names the app and action, never the token or the upstream credential.
    records = setup.gateway.audit_records()
    assert {(r["action"], r["app"], r["decision"]) for r in records if r["action"]} >= {
        ("images:push", "web-staging", "allow"), ("images:pull", "web-staging", "allow")}
    text = setup.gateway.audit_text()
    assert token not in text and UPSTREAM_SECRET not in text
    for output in (raw.stdout, raw.stderr, back.stderr, appended.stderr, digest.stderr):
        assert UPSTREAM_SECRET not in output


def test_uploads_monolithic_and_chunked_with_locations_back_to_the_gateway(setup: Setup) -> None:
    token = setup.gateway.mint("deployer@app:web-staging")
    with setup.http(token) as client:
        one = b"monolithic blob"
        digest = "sha256:" + hashlib.sha256(one).hexdigest()
        # A monolithic POST: distribution 2.8 answers it as a new upload (202) as the spec allows;
        # whatever it answers, the Location points back at the gateway.
        done = client.post(f"/v2/web-staging/blobs/uploads/?digest={digest}", content=one)
        assert (done.status_code, done.headers["location"].rsplit("/", 1)[0]) in (
            (201, "/v2/web-staging/blobs"), (202, "/v2/web-staging/blobs/uploads"))
        # POST, PATCH, PATCH, PUT: every Location is gateway-relative, never the upstream's host.
        data = b"chunk-one-" * 100 + b"chunk-two-" * 100
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = client.post("/v2/web-staging/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["location"]
        assert location.startswith("/v2/web-staging/blobs/uploads/") and "_state=" in location
        for start, chunk in ((0, data[:1000]), (1000, data[1000:])):
            patched = client.patch(location, content=chunk, headers={
                "Content-Range": f"{start}-{start + len(chunk) - 1}", "Content-Type": "application/octet-stream"})
            assert patched.status_code == 202, patched.text
            location = patched.headers["location"]
            assert location.startswith("/v2/web-staging/blobs/uploads/")
        closed = client.put(f"{location}&digest={digest}")
        assert closed.status_code == 201 and closed.headers["location"] == f"/v2/web-staging/blobs/{digest}"
        assert client.get(f"/v2/web-staging/blobs/{digest}").content == data
        # POST, then the whole blob in the PUT.
        last = b"all in the put"
        digest = "sha256:" + hashlib.sha256(last).hexdigest()
        location = client.post("/v2/web-staging/blobs/uploads/").headers["location"]
        assert client.put(f"{location}&digest={digest}", content=last).status_code == 201
        head = client.head(f"/v2/web-staging/blobs/{digest}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(last))
    for record in setup.gateway.audit_records():
        assert str(setup.registry.port) not in json.dumps(record)


def test_blobs_are_not_bound_by_max_body_bytes_but_by_max_blob_bytes(
        tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], registry: LocalRegistry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    setup = open_setup(tmp_path, upstream, registry, limits={"max_body_bytes": 1024, "max_blob_bytes": 256 * 1024})
    try:
        token = setup.gateway.mint("deployer@app:web-staging")
        with setup.http(token) as client:
            data = bytes(range(256)) * 400  # 100 KiB: far over max_body_bytes, under max_blob_bytes
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            location = client.post("/v2/web-staging/blobs/uploads/").headers["location"]
            pieces = (data[i:i + 8192] for i in range(0, len(data), 8192))  # sent chunked, streamed
            patched = client.patch(location, content=pieces)
            assert patched.status_code == 202, patched.text
            assert client.put(f"{patched.headers['location']}&digest={digest}").status_code == 201
            mark = setup.log.mark()
            too_big = client.post("/v2/web-staging/blobs/uploads/?digest=sha256:" + "0" * 64,
                                  content=b"x" * (256 * 1024 + 1))
            assert too_big.status_code == 413 and errors_of(too_big) == "SIZE_INVALID"
            assert "limits.max_blob_bytes" in too_big.json()["message"]
            manifest = client.put("/v2/web-staging/manifests/big", content=b"{" + b" " * 2048 + b"}",
                                  headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
            assert manifest.status_code == 413 and "limits.max_body_bytes" in manifest.json()["message"]
            setup.refused_quietly(mark)
            # Sent chunked, with no length to check first: cut off at the limit while streaming (the
            # upstream gets a truncated PATCH and drops it).
            location = client.post("/v2/web-staging/blobs/uploads/").headers["location"]
            cut = client.patch(location, content=(b"y" * 65536 for _ in range(5)))
            assert cut.status_code == 413 and "limits.max_blob_bytes" in cut.json()["message"]
    finally:
        setup.gateway.server.stop()


def test_push_to_another_apps_repository_is_refused(setup: Setup) -> None:
    token = setup.gateway.mint("deployer@app:web-staging")
    image = make_image(setup.folder, "other", {"x": b"other app"})
    mark = setup.log.mark()
    done = setup.clients.skopeo_copy(image.reference, setup.ref("api-staging:v1"), token)
    assert done.returncode != 0
    assert "403" in done.stderr or "denied" in done.stderr.lower(), done.stderr
    with setup.http(token) as client:
        refused = client.post("/v2/api-staging/blobs/uploads/")
        assert refused.status_code == 403 and errors_of(refused) == "DENIED"
        assert client.get("/v2/api-staging/tags/list").status_code == 403
    setup.refused_quietly(mark)


def test_mount_needs_pull_on_the_source_and_push_on_the_target(setup: Setup) -> None:
    both = setup.gateway.mint("deployer@app:web-staging", "deployer@app:api-staging")
    image = make_image(setup.folder, "mount", {"m": b"mounted layer"})
    setup.push(image, "web-staging:mount", both)
    mark = setup.log.mark()
    with setup.http(both) as client:  # allowed: pull on web-staging, push on api-staging
        mounted = client.post(f"/v2/api-staging/blobs/uploads/?mount={image.layer_digest}&from=web-staging")
        assert mounted.status_code == 201
        assert mounted.headers["location"] == f"/v2/api-staging/blobs/{image.layer_digest}"
    assert [m for m, target, s in setup.log.since(mark) if "from=web-staging" in target and s == 201] == ["POST"]
    narrow = setup.gateway.mint("deployer@app:api-staging")
    mark = setup.log.mark()
    with setup.http(narrow) as client:  # web-staging is not the token's to read
        refused = client.post(f"/v2/api-staging/blobs/uploads/?mount={image.layer_digest}&from=web-staging")
        assert refused.status_code == 403 and errors_of(refused) == "DENIED"
        assert client.post("/v2/api-staging/blobs/uploads/?from=web-staging").status_code == 400
    setup.refused_quietly(mark)


def test_upload_session_is_bound_to_its_repository(setup: Setup) -> None:
    both = setup.gateway.mint("deployer@app:web-staging", "deployer@app:api-staging")
    with setup.http(both) as client:
        location = client.post("/v2/web-staging/blobs/uploads/").headers["location"]
        mark = setup.log.mark()
        elsewhere = location.replace("/v2/web-staging/", "/v2/api-staging/")
        for method in ("PATCH", "PUT", "GET", "DELETE"):
            refused = client.request(method, elsewhere, content=b"data" if method in ("PATCH", "PUT") else None)
            assert refused.status_code == 403 and errors_of(refused) == "DENIED", (method, refused.text)
        unknown = client.patch("/v2/web-staging/blobs/uploads/00000000-0000-4000-8000-000000000000?_state=x",
                               content=b"data")
        assert unknown.status_code == 404 and errors_of(unknown) == "BLOB_UPLOAD_UNKNOWN"
        setup.refused_quietly(mark)
        assert client.patch(location, content=b"data").status_code == 202  # where it was opened: fine


def test_delete_needs_admin(setup: Setup) -> None:
    deployer = setup.gateway.mint("deployer@app:web-staging")
    image = make_image(setup.folder, "gone", {"g": b"to be deleted"})
    setup.push(image, "web-staging:gone", deployer)
    mark = setup.log.mark()
    with setup.http(deployer) as client:
        refused = client.delete(f"/v2/web-staging/manifests/{image.manifest_digest}")
        assert refused.status_code == 403 and errors_of(refused) == "DENIED"
        assert client.delete(f"/v2/web-staging/blobs/{image.layer_digest}").status_code == 403
    setup.refused_quietly(mark)
    mark = setup.log.mark()
    assert setup.clients.skopeo("delete", setup.ref("web-staging:gone"), deployer).returncode != 0
    assert [line for line in setup.log.since(mark) if line[0] in WRITES] == []  # it may resolve the tag (pull)
    admin = setup.gateway.mint("admin@app:web-staging")
    done = setup.clients.skopeo("delete", setup.ref("web-staging:gone"), admin)
    assert done.returncode == 0, done.stderr
    assert setup.clients.skopeo("inspect", setup.ref("web-staging:gone"), admin).returncode != 0


def test_catalog_and_unknown_paths_are_refused(setup: Setup) -> None:
    admin = setup.gateway.mint("admin@app:*")
    mark = setup.log.mark()
    with setup.http(admin) as client:
        catalog = client.get("/v2/_catalog")
        assert catalog.status_code == 403 and errors_of(catalog) == "DENIED"
        assert client.get("/v2/_catalog?n=10").status_code == 403
        assert client.get("/v2/web-staging/manifests/v1?foo=bar").status_code == 400
        assert client.get("/v2/web-staging/tags/list?n=1&n=2").status_code == 400
        assert client.put("/v2/web-staging/blobs/sha256:" + "a" * 64, content=b"x").status_code == 405
        assert client.get(f"/v2/web-staging/manifests/v1?x=sgt_{'a' * 20}").status_code == 400
    assert setup.clients.crane_login(admin).returncode == 0
    assert setup.clients.crane("catalog", setup.host).returncode != 0
    auth = f"Authorization: Bearer {admin}\r\n".encode()
    for target in (b"/v2/web-staging/things", b"/v2/a/b/manifests/latest", b"/v2/Web-Staging/tags/list",
                   b"/v2/web%2Dstaging/tags/list", b"/v2/web-staging/../api-staging/tags/list",
                   b"/v2/web-staging/manifests/a/b", b"/v2//web-staging/tags/list"):
        status, _, body = raw_request(setup.gateway.port, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n" + auth
                                      + b"Connection: close\r\n\r\n")
        assert status == 404, (target, body)
        assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    setup.refused_quietly(mark)


def test_viewer_pulls_but_cannot_push(setup: Setup) -> None:
    deployer = setup.gateway.mint("deployer@app:web-staging")
    viewer = setup.gateway.mint("viewer@app:web-staging")
    image = make_image(setup.folder, "seen", {"s": b"seen"})
    setup.push(image, "web-staging:seen", deployer)
    assert setup.clients.skopeo("inspect", setup.ref("web-staging:seen"), viewer).returncode == 0
    mark = setup.log.mark()
    done = setup.clients.skopeo_copy(make_image(setup.folder, "new", {"n": b"new"}).reference,
                                     setup.ref("web-staging:new"), viewer)
    assert done.returncode != 0
    assert [line for line in setup.log.since(mark) if line[0] in WRITES] == []  # HEADs may go (pull)


def test_the_upstream_checks_the_injected_credential(
        tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], registry: LocalRegistry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "fm2_not-the-registry-credential"
    monkeypatch.setenv(CREDENTIAL_ENV, wrong)
    setup = open_setup(tmp_path, upstream, registry)
    try:
        token = setup.gateway.mint("deployer@app:web-staging")
        mark = setup.log.mark()
        with setup.http(token) as client:
            answer = client.get("/v2/web-staging/tags/list")
        assert answer.status_code == 502 and "credential" in answer.json()["message"]
        assert wrong not in answer.text and "www-authenticate" not in answer.headers
        assert setup.log.since(mark) == [("GET", "/v2/web-staging/tags/list", 401)]
        assert wrong not in setup.gateway.audit_text()
    finally:
        setup.gateway.server.stop()


def test_machines_still_get_the_fly_registry_name(setup: Setup) -> None:
    # A deployer pushes to <gateway>/web-staging; the Machines API must be told registry.fly.io/web-staging.
    token = setup.gateway.mint("deployer@app:web-staging")
    recorder = setup.gateway.upstream
    with setup.http(token) as client:
        for image, status in ((f"{setup.host}/web-staging:v1", 403), ("registry.fly.io/web-staging:v1", 200)):
            recorder.clear()
            answer = client.post("/v1/apps/web-staging/machines", json={"config": {"image": image}})
            assert answer.status_code == status, answer.text
            assert len(recorder.received) == (status == 200)


# --- the red team's findings, each a regression test -------------------------------------------------

@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=b"])
def test_a_mount_spelled_in_a_form_body_is_refused(setup: Setup, content_type: str) -> None:
    both = setup.gateway.mint("deployer@app:web-staging", "deployer@app:web-prod")
    image = make_image(setup.folder, "secret", {"s": b"a production layer"})
    setup.push(image, "web-prod:secret", both)
    staging = setup.gateway.mint("deployer@app:web-staging")
    mark = setup.log.mark()
    body = f"mount={image.layer_digest}&from=web-prod".encode()
    if content_type.startswith("multipart"):
        body = (f'--b\r\nContent-Disposition: form-data; name="mount"\r\n\r\n{image.layer_digest}\r\n--b\r\n'
                'Content-Disposition: form-data; name="from"\r\n\r\nweb-prod\r\n--b--\r\n').encode()
    with setup.http(staging) as client:
        refused = client.post("/v2/web-staging/blobs/uploads/", content=body, headers={"Content-Type": content_type})
        assert refused.status_code == 400 and errors_of(refused) == "UNSUPPORTED"
        bare = client.post("/v2/web-staging/blobs/uploads/", content=body,
                           headers={"Content-Type": "application/octet-stream"})
        assert bare.status_code == 400  # a body only with ?digest= (monolithic)
        setup.refused_quietly(mark)
        assert client.head(f"/v2/web-staging/blobs/{image.layer_digest}").status_code == 404  # nothing mounted


def test_the_clients_host_never_reaches_the_registry(setup: Setup) -> None:
    token = setup.gateway.mint("deployer@app:web-staging")
    with setup.http(token) as client:
        started = client.post("/v2/web-staging/blobs/uploads/", headers={"Host": "elsewhere.example, gw"})
        assert started.status_code == 202 and started.headers["location"].startswith("/v2/web-staging/blobs/uploads/")


def test_max_blob_bytes_bounds_the_whole_upload_not_each_request(
        tmp_path: Path, upstream: tuple[RecordingUpstream, ServerThread], registry: LocalRegistry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CREDENTIAL_ENV, UPSTREAM_SECRET)
    setup = open_setup(tmp_path, upstream, registry, limits={"max_blob_bytes": 64 * 1024})
    try:
        token = setup.gateway.mint("deployer@app:web-staging")
        with setup.http(token) as client:
            location = client.post("/v2/web-staging/blobs/uploads/").headers["location"]
            for _ in range(2):  # 2 x 32 KiB: the whole 64 KiB
                patched = client.patch(location, content=b"z" * 32 * 1024,
                                       headers={"Content-Type": "application/octet-stream"})
                assert patched.status_code == 202, patched.text
                location = patched.headers["location"]
            over = client.patch(location, content=b"z" * 1024, headers={"Content-Type": "application/octet-stream"})
            assert over.status_code == 413 and "limits.max_blob_bytes" in over.json()["message"]
    finally:
        setup.gateway.server.stop()
