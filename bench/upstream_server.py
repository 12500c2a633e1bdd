"""A minimal fast upstream, used by `bench/run` only when nginx is not installed.

Answers every request with the same small JSON body over HTTP/1.1 keep-alive. It parses just
enough (request heads, Content-Length bodies) for the benchmark's requests; it is not a server
for anything else.

    python bench/upstream_server.py --port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

# `internal_numeric_id` too: bench/attenuation.py's gateway asks GET /v1/apps/{app} for it.
BODY = b'{"internal_numeric_id":4242,"machines":[{"id":"148e","name":"web-1","state":"started","region":"ams"}]}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


class Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's TCPTransport is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = self.buffer[:head_end].lower()
            length = 0
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker + 2)
                length = int(head[marker + 17: line_end if line_end >= 0 else None].strip())
            total = head_end + 4 + length
            if len(self.buffer) < total:
                break
            self.buffer = self.buffer[total:]
            out.append(RESPONSE)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Responder, host, port, backlog=2048, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run: Any = asyncio.run
    try:
        import uvloop

        run = uvloop.run
    except (ImportError, AttributeError):
        pass
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
