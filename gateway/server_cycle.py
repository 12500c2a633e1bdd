"""One request's ASGI cycle on a connection: uvicorn's, with the answer written in fewer writes.

`OneWriteCycle` is uvicorn's `RequestResponseCycle` (httptools) with one change in what reaches
the socket: the head of an answer (`http.response.start`) is held back and written together with
the answer's first body bytes, so an answer that fits one body message leaves in one write (one
system call, one TCP segment for the client to read) instead of two. The surfaces' relay sends
the last body part with `more_body: False` when the upstream's answer has ended, so a proxied
answer of known length goes out in one write too.

Everything else is as uvicorn does it: the status line, the framing (Content-Length when given,
else chunked; none for HEAD, 204 and 304), `connection: close` when the connection will not be
kept alive, the checks on header names and values (one pass over all of them instead of a regex
search per header), errors for a body longer or shorter than its Content-Length. One difference:
the Content-Length of a 204 or 304 is not waited for, as for HEAD (uvicorn failed the answer).
And for a relayed answer: a client that takes none of it for SEND_STALL_S is cut off, and a body
part that more would follow raises ClientDisconnected once the client left (uvicorn returns), so
the relay stops reading the upstream.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, RequestResponseCycle

SEND_STALL_S = 60.0  # a client that takes none of an answer for this long is cut off (nginx's send_timeout)


class ClientDisconnected(OSError):
    """Raised to a sender of a streamed answer's body whose client has left (as ASGI allows), so
    that it stops reading what it relays (surfaces/http.py `relay`)."""


class OneWriteCycle(RequestResponseCycle):
    _head: bytes | None = None  # the answer's head, written with the first body bytes
    _bodyless = False  # 204 and 304 answers have no body, whatever Content-Length they state

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            try:
                async with asyncio.timeout(SEND_STALL_S):
                    await self.flow.drain()
            except TimeoutError:  # it would hold the relay, its buffers and an upstream connection for ever
                self.transport.abort()  # close() would wait for the buffer the client does not take
                self.disconnected = True
        if self.disconnected:
            if message.get("more_body"):  # more would follow: the sender stops instead (uvicorn returns)
                raise ClientDisconnected("the client disconnected")
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            if self.access_log:  # uvicorn's own path logs the request; the gateway never turns it on
                await super().send(message)
                return
            self._start(message["status"], message.get("headers", ()))
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
            self._body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")

    def _start(self, status: int, headers: Any) -> None:
        self.response_started = True
        self.waiting_for_100_continue = False
        self._bodyless = status in (204, 304)
        headers = [*self.default_headers, *headers]
        names = b"-".join(name for name, _ in headers)  # '-' is allowed in a name, a tab in a value
        if HEADER_RE.search(names):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"\t".join(value for _, value in headers)):
            raise RuntimeError("Invalid HTTP header value.")
        content = [STATUS_LINE[status]]
        has_connection_close = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [token.lower().strip() for token in value.split(b",")]:
                self.keep_alive = False
                has_connection_close = True
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self._head = b"".join(content)

    def _body(self, body: bytes, more_body: bool) -> None:
        head, self._head = self._head, None
        if self.scope["method"] == "HEAD" or self._bodyless:  # a length they state is the representation's
            self.expected_content_length = 0
            out = head or b""
        elif self.chunked_encoding:
            out = (head or b"") + (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + (
                b"" if more_body else b"0\r\n\r\n")
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            out = head + body if head else body
        if out:
            self.transport.write(out)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()
