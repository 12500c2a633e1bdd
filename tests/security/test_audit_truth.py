"""The audit log tells the truth about what reached the upstream (issue 15, class 6).

The red team's example: a body that stalls or outgrows `limits.max_body_bytes` after forwarding
began was audited `deny`, although the upstream already had the request's head and part of its
body. Now the Machines API, GraphQL and REST surfaces read a body whole before forwarding (their
bodies are small JSON), so such a request reaches the upstream not at all and `deny` is true; the
registry streams layers, so a cut upload is audited `allow` with `forwarded: incomplete` and the
status that ended it. Every case asserts on the recording upstream and on the audit line.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import RunningGateway
from tests.security.harness import Answer, audit_record, request, reset, running_gateway, wait_for
from tests.servers import Reply, raw_request

LIMIT = 4096
METADATA = b"/v1/apps/web-staging/machines/m1/metadata/role"  # no constraint: read only to be forwarded
BLOB_DIGEST = "sha256:" + hashlib.sha256(b"layer").hexdigest()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(tmp_path_factory.mktemp("sec-audit-truth"), upstream_urls={"registry_url": ""},
                         limits={"max_body_bytes": LIMIT, "max_blob_bytes": LIMIT}) as running:
        yield running


@pytest.fixture(scope="module")
def token(gateway: RunningGateway) -> str:
    return gateway.mint("deployer@app:web-staging", name="audit-truth")


@pytest.fixture
def gw(gateway: RunningGateway) -> RunningGateway:
    return reset(gateway)


def chunked(total: int, size: int = 1000) -> bytes:
    out = b""
    while total > 0:
        piece = min(size, total)
        out += hex(piece)[2:].encode() + b"\r\n" + b"x" * piece + b"\r\n"
        total -= piece
    return out + b"0\r\n\r\n"


def answered(gateway: RunningGateway, data: bytes, timeout: float = 15.0) -> Answer:
    status, headers, body = raw_request(gateway.port, data, timeout=timeout)
    return Answer(status, headers, body)


def sent_in_two(gateway: RunningGateway, data: bytes) -> Answer:
    """The request's head and 2000 bytes of its body, a pause (long enough for a gateway that
    streams to pass them on), then the rest; the answer."""
    cut = data.index(b"\r\n\r\n") + 4 + 2000
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=15) as sock:
        sock.sendall(data[:cut])
        time.sleep(0.5)
        sock.sendall(data[cut:])
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])}
    return Answer(int(head.split(b" ", 2)[1]), headers, body)


def test_stalled_body_is_refused_with_nothing_forwarded_and_audited_deny(token: str, gw: RunningGateway) -> None:
    head = request("POST", METADATA, token=token, headers=[(b"Content-Type", b"application/json"),
                                                            (b"Content-Length", b"100")], close=False)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as sock:
        sock.sendall(head + b'{"value":')  # and then nothing more
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status = int(received.split(b" ", 2)[1])
    assert status == 408, received[:300]
    request_id = next(line.split(b":", 1)[1].strip().decode() for line in received.split(b"\r\n")
                      if line.lower().startswith(b"x-request-id:"))
    record = audit_record(gw, Answer(status, {"x-request-id": request_id}, b""))
    assert (record["decision"], record["status"]) == ("deny", 408)
    time.sleep(0.2)
    assert gw.upstream.received == []  # not even the request's head


def test_oversized_streamed_body_is_refused_with_nothing_forwarded_and_audited_deny(token: str,
                                                                                     gw: RunningGateway) -> None:
    answer = sent_in_two(gw, request("POST", METADATA, token=token, body=chunked(3 * LIMIT),
                                     headers=[(b"Content-Type", b"application/json"),
                                              (b"Transfer-Encoding", b"chunked")]))
    assert answer.status == 413, answer.body[:300]
    record = audit_record(gw, answer)
    assert (record["decision"], record["status"]) == ("deny", 413)
    time.sleep(0.2)
    assert gw.upstream.received == []


def test_registry_upload_cut_after_forwarding_began_is_audited_allow_and_incomplete(token: str,
                                                                                    gw: RunningGateway) -> None:
    """Layers are streamed: the registry saw the start of this upload, so the audit says so."""
    target = f"/v2/web-staging/blobs/uploads/?digest={BLOB_DIGEST}".encode()
    answer = sent_in_two(gw, request("POST", target, token=token, body=chunked(3 * LIMIT),
                                     headers=[(b"Content-Type", b"application/octet-stream"),
                                              (b"Transfer-Encoding", b"chunked")]))
    assert answer.status == 413, answer.body[:300]
    record = audit_record(gw, answer)
    assert (record["decision"], record["status"]) == ("allow", 413)
    assert record["forwarded"] == "incomplete"
    assert "forwarding did not complete" in record["reason"] and "too_large" in record["reason"]
    assert wait_for(lambda: len(gw.upstream.received) == 1)
    (got,) = gw.upstream.received
    assert not got.complete and len(got.body) <= LIMIT  # the upstream saw a head and a cut body


def test_registry_upload_within_the_limit_is_audited_allow_without_a_note(token: str, gw: RunningGateway) -> None:
    target = f"/v2/web-staging/blobs/uploads/?digest={BLOB_DIGEST}".encode()
    answer = answered(gw, request("POST", target, token=token, body=b"layer",
                                  headers=[(b"Content-Type", b"application/octet-stream")]))
    assert answer.status == 200, answer.body[:300]
    record = audit_record(gw, answer)
    assert (record["decision"], record["status"]) == ("allow", 200) and "forwarded" not in record
    (got,) = gw.upstream.received
    assert got.complete and got.body == b"layer" and got.header("content-length") == ["5"]


def test_upstream_timeout_after_the_request_arrived_is_audited_allow_and_incomplete(token: str,
                                                                                    gw: RunningGateway) -> None:
    """The upstream has the whole request and may act on it; it only answered too late."""
    gw.upstream.reply = Reply(delay_s=4.0)  # the test gateway's upstream.read_timeout_s is 3
    body = b'{"value":"blue"}'
    answer = answered(gw, request("POST", METADATA, token=token, body=body,
                                  headers=[(b"Content-Type", b"application/json")]))
    assert answer.status == 504, answer.body[:300]
    record = audit_record(gw, answer)
    assert (record["decision"], record["status"], record["forwarded"]) == ("allow", 504, "incomplete")
    assert "upstream_timeout" in record["reason"]
    (got,) = gw.upstream.received
    assert got.complete and got.body == body
