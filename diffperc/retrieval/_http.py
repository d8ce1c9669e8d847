"""HTTP plumbing of the retrieval service: the ASGI guard (token, body size, body deadline) and a header deadline.

Why a header deadline here: uvicorn's ``timeout_keep_alive`` only runs while a connection is
idle between requests and is cancelled by the first byte of the next one, and its h11 parser
has no clock, so a client that sends one header byte a second holds a connection (and a
slot of ``limit_concurrency``) for ever. :func:`h11_protocol_with_deadline` returns uvicorn's
h11 protocol with a timer from the first byte of a request (or the connection's opening)
until its headers are complete; when it fires the client gets ``408`` and the connection is
closed. Once the headers are in, :class:`Guard` gives the body its own deadline (``408`` too).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

__all__ = ["Guard", "h11_protocol_with_deadline", "send_json"]

_DRAIN_CAP = 256 * 2**20  # read (and drop) at most this much of a refused body so the client sees the answer


async def send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Send a whole JSON response and ask the server to close the connection."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
           (b"connection", b"close")] + [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def _drain(receive: Any, cap: int, deadline: float) -> None:
    """Read and drop the rest of a request body (up to ``cap`` bytes, until ``deadline``) before answering early."""
    seen = 0
    while seen <= cap:
        try:
            msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            return
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


class Guard:
    """Pure ASGI middleware: bearer token, then body size and body deadline (the body is buffered to check them).

    Args:
        app: the ASGI app behind the guard.
        token: bearer token; None lets every request through.
        max_bytes: largest body; larger gets 413 (before the body is read when Content-Length says so).
        body_timeout: seconds from the end of the headers to the end of the body; slower gets 408.
    """

    def __init__(self, app: Any, token: str | None, max_bytes: int, body_timeout: float = 60.0) -> None:
        self.app, self.max_bytes, self.body_timeout = app, max_bytes, body_timeout
        self.token = f"Bearer {token}".encode() if token else None

    def _authorized(self, scope: dict[str, Any]) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.body_timeout
        if self.token is not None and scope["path"] != "/healthz" and not self._authorized(scope):
            await _drain(receive, self.max_bytes, deadline)
            return await send_json(send, 401, {"detail": "missing or wrong token: send the header "
                                               "'Authorization: Bearer <token>'"}, {"www-authenticate": "Bearer"})
        too_big = {"detail": f"request body larger than the limit of {self.max_bytes / 2**20:g} MB "
                             "(--max-upload-mb)"}
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= _DRAIN_CAP:
                await _drain(receive, _DRAIN_CAP, deadline)
            return await send_json(send, 413, too_big)
        body = bytearray()
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                return await send_json(send, 408, {"detail": f"request body not received within {self.body_timeout:g} s "
                                                   "(--body-timeout): send it faster or in a smaller request"})
            if msg["type"] != "http.request":
                return  # client went away
            body += msg.get("body", b"")
            if len(body) > self.max_bytes:
                if msg.get("more_body", False):
                    await _drain(receive, _DRAIN_CAP, deadline)
                return await send_json(send, 413, too_big)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def h11_protocol_with_deadline(header_timeout: float) -> type:
    """uvicorn's ``H11Protocol`` cutting off a request whose headers take longer than ``header_timeout`` s.

    The clock starts when the connection opens or when the first byte of a request arrives
    after the previous response; it stops when the headers are complete. Pass the class as
    ``uvicorn.run(..., http=cls)``.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    message = (f"request headers not received within {header_timeout:g} s (--header-timeout)\n").encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
              b"content-length: " + str(len(message)).encode() + b"\r\n\r\n" + message)

    class DeadlineH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_headers():
                self._arm()
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # the keep-alive timer covers the idle time until the next byte
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.logger.warning("closing a connection from %s: %s", self.client, message.decode().strip())
                self.transport.write(answer)
                self.transport.close()

    return DeadlineH11Protocol
