"""An ASGI middleware that refuses request bodies over a byte limit with 413, before any parsing.

It keeps at most ``max_bytes`` whatever the client declares (a lying or absent Content-Length,
chunked uploads), so an oversized body never reaches JSON parsing. The rest of an oversized body is
read and discarded (up to ``DRAIN_BYTES``) before answering: a client still writing its body when the
server closes the connection would see a reset instead of the 413 and its message.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_BYTES = 16 * 1024 * 1024


class BodyLimitMiddleware:
    """Buffer each request body up to ``max_bytes``; answer 413 above it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _reply(send, 400, "Content-Length is not a number")
                return
            if size > self.max_bytes:
                if size <= DRAIN_BYTES:
                    await _drain(receive)
                await _reply(send, 413, self._too_large())
                return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                if more:
                    await _drain(receive, len(body))
                await _reply(send, 413, self._too_large())
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes"


async def _drain(receive: Receive, seen: int = 0) -> None:
    """Read and drop the rest of a body, up to ``DRAIN_BYTES`` in all."""
    while seen <= DRAIN_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as the app expects

    return replay


async def _reply(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
