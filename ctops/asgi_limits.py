"""One request-body limit for every ASGI server ctops runs (ops API, trainer, LLM pool).

The body is counted as it arrives, so a chunked body (no Content-Length) is held to the same limit
as a declared one: the server stops buffering at the limit and answers 413, instead of reading a
body of any size into memory first. The rest of an oversized body is left to the HTTP server,
which discards it without buffering once the response is complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctops.opsapi import error_body

# (status, message) -> the JSON body of an error answer, in the shape the wrapped API uses
ErrorShape = Callable[[int, str], dict[str, Any]]
# (path, status, message): told of every body refused here, to count it (ctops.rejects)
OnReject = Callable[[str, int, str], None]


def ops_error(status: int, message: str) -> dict[str, Any]:
    """The ops API's shape (ctops.opsapi): {"error": ..., "detail": ...}."""
    return error_body(message)


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413 before the app sees them, whether or not a
    Content-Length was sent; a malformed Content-Length is a 400."""

    def __init__(self, app: ASGIApp, max_bytes: int, error: ErrorShape = ops_error,
                 on_reject: OnReject | None = None) -> None:
        self.app, self.max_bytes, self.error, self.on_reject = app, max_bytes, error, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await self._answer(scope, send, 400, "invalid Content-Length")
                    return
                if int(value) > self.max_bytes:
                    await self._answer(scope, send, 413, f"request body over {self.max_bytes} bytes")
                    return
        # read the whole body here (bodies under the limit are small) so an oversized one never
        # reaches the app, whose body parsing would turn any error into a generic 400
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._answer(scope, send, 413, f"request body over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)

    async def _answer(self, scope: Scope, send: Send, status: int, message: str) -> None:
        if self.on_reject is not None:
            self.on_reject(scope.get("path", ""), status, message)
        await send_json(send, status, json.dumps(self.error(status, message)).encode())


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app a body already read, whole, then what the client sends next."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An answer made without the app: a JSON body already encoded."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
